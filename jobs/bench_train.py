"""
`python -m jobs bench train`: base-training throughput of a GPT of a given depth on this machine
(real data: the prepared shards and tokenizer under the base dir). Prints one line per variant
and, with --json, one JSON object as the last line: tokens/s, MFU where the device's bf16 peak is
known, device batch size and its source. --device-batch-size 0 lets nanochat.auto_batch_size
choose; --baseline-batch-size N also runs a fixed batch of N and reports auto / fixed.
--compare-precision runs the fp32 step and the `fast` one (bf16 autocast on CUDA and CPUs with AMX,
fp32 elsewhere: nanochat.train_loop.train_precision_route) alternately, --rounds times each, and reports the best
tokens/s of each, their ratio and how far the fast run's final loss is from fp32's (same data, init).
"""
from __future__ import annotations

import argparse
import json

from nanochat.base_train import BaseTrainConfig, run as run_base_train
from nanochat.common import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--depth", type=int, default=4, help="model depth (width = 64 * depth)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per row")
    parser.add_argument("--device-batch-size", type=int, default=8, help="rows per micro-batch (0 = automatic)")
    parser.add_argument("--total-batch-size", type=int, default=0,
                        help="tokens per optimizer step (0: one micro-batch; 16 rows per rank when automatic)")
    parser.add_argument("--baseline-batch-size", type=int, default=0,
                        help="also run this fixed device batch size and report the ratio to it")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per variant; the first is untimed")
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--precision", default="auto", choices=["auto", "fast", "fp32", "bf16"],
                        help="matmul precision (auto: bf16 on cuda, fp32 on cpu; fast: bf16 also on CPUs with AMX)")
    parser.add_argument("--compare-precision", action="store_true",
                        help="run fp32 and fast (--fast-as bf16 forces bf16) alternately; report the ratio and the final-loss gap")
    parser.add_argument("--fast-as", default="fast", choices=["fast", "bf16"],
                        help="the precision compared against fp32 (bf16: force autocast, to measure it on any CPU)")
    parser.add_argument("--rounds", type=int, default=2, help="alternations of --compare-precision; best counts")
    parser.add_argument("--compile", default="auto", help="auto (on for cuda) | on | off")
    parser.add_argument("--device", default="", help="cpu, cuda or mps (default: auto)")
    parser.add_argument("--base-dir", default="", help="shared artifacts (data, tokenizer); default NANOCHAT_BASE_DIR")
    parser.add_argument("--data-source", default="", help="a folder of shards or .txt/.jsonl (default: Python's own text)")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")


def _variant(args, device_batch_size: int, total: int, precision: str | None = None) -> dict:
    if total == 0 and device_batch_size == 0:
        total = 16 * args.seq_len
    cfg = BaseTrainConfig(base_dir=args.base_dir, out_dir="", device_type=args.device, depth=args.depth,
                          seq_len=args.seq_len, vocab_size=args.vocab_size, device_batch_size=device_batch_size,
                          total_batch_size=total, num_steps=args.steps, eval_tokens=1, log_every=max(1, args.steps),
                          compile=args.compile, data_source=args.data_source, precision=precision or args.precision)
    return run_base_train(cfg)


def run(args: argparse.Namespace) -> int:
    if args.steps < 2:
        raise ConfigError(f"bench train --steps: need at least 2 (the first is warm-up), got {args.steps}")
    if args.compare_precision:
        return _compare_precision(args)
    variants = {("auto" if args.device_batch_size == 0 else "config"): args.device_batch_size}
    if args.baseline_batch_size:
        variants["baseline"] = args.baseline_batch_size
    results = {}
    total = args.total_batch_size
    for name, bs in variants.items():
        row = _variant(args, bs, total)
        total = row["total_batch_size"]  # the baseline trains at the same total batch
        results[name] = {k: row.get(k) for k in (
            "tokens_per_s", "mfu", "device_batch_size", "batch_size_source", "grad_accum_steps",
            "total_batch_size", "peak_memory_bytes", "compile", "num_compiles", "final_loss", "n_params",
            "flops_per_token", "device_name", "world_size")}
        mfu = row.get("mfu")
        print(f"{name:<9} depth={args.depth} T={args.seq_len} B={row['device_batch_size']} "
              f"({row['batch_size_source']}) tok/s={row['tokens_per_s']:,.0f}"
              + (f" mfu={mfu:.1f}%" if mfu is not None else ""), flush=True)
    out = {"bench": "train", "depth": args.depth, "seq_len": args.seq_len, "steps": args.steps, "variants": results}
    main = results[next(iter(variants))]
    out["tokens_per_s"], out["mfu"] = main["tokens_per_s"], main["mfu"]
    if "baseline" in results and results["baseline"]["tokens_per_s"]:
        out["ratio_vs_baseline"] = main["tokens_per_s"] / results["baseline"]["tokens_per_s"]
        print(f"tokens/s ratio {next(iter(variants))} / baseline: {out['ratio_vs_baseline']:.2f}x")
    if args.json:
        print(json.dumps(out, sort_keys=True, default=str))
    return 0


def _compare_precision(args: argparse.Namespace) -> int:
    import torch
    from nanochat.common import autodetect_device_type
    from nanochat.train_loop import train_precision_route
    if args.rounds < 1:
        raise ConfigError(f"bench train --rounds: need at least 1, got {args.rounds}")
    device = torch.device(args.device or autodetect_device_type())
    routes = {"fp32": "fp32", "fast": train_precision_route(args.fast_as, device)}
    best: dict[str, dict] = {}
    for _ in range(args.rounds):      # alternate, so a load change on a shared machine hits both
        for name in routes:
            row = _variant(args, args.device_batch_size, args.total_batch_size, precision=routes[name])
            if name not in best or row["tokens_per_s"] > best[name]["tokens_per_s"]:
                best[name] = row
    out = {"bench": "train", "depth": args.depth, "seq_len": args.seq_len, "steps": args.steps,
           "rounds": args.rounds, "variants": {}}
    for name, row in best.items():
        out["variants"][name] = {"precision": routes[name], "tokens_per_s": row["tokens_per_s"],
                                 "final_loss": row.get("final_loss"), "device_batch_size": row["device_batch_size"]}
        print(f"{name:<5} ({routes[name]}) depth={args.depth} T={args.seq_len} B={row['device_batch_size']} "
              f"tok/s={row['tokens_per_s']:,.0f} final_loss={row.get('final_loss'):.4f}", flush=True)
    fp32, fast = best["fp32"], best["fast"]
    out["ratio_fast_vs_fp32"] = fast["tokens_per_s"] / fp32["tokens_per_s"]
    out["final_loss_gap"] = abs(fast["final_loss"] - fp32["final_loss"]) / abs(fp32["final_loss"])
    print(f"fast ({routes['fast']}) / fp32: {out['ratio_fast_vs_fp32']:.2f}x tokens/s; final loss within "
          f"{100 * out['final_loss_gap']:.2f}% of fp32 after {args.steps} steps (best of {args.rounds} alternations)")
    if args.json:
        print(json.dumps(out, sort_keys=True, default=str))
    return 0


if __name__ == "__main__":
    import sys
    from jobs.command import run_module
    sys.exit(run_module(sys.modules[__name__], None, "python -m jobs.bench_train"))

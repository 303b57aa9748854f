"""
`python -m jobs bench train`: base-training throughput of a GPT of a given depth on this machine
(real data: the prepared shards and tokenizer under the base dir). Prints one line per variant
and, with --json, one JSON object as the last line: tokens/s, MFU where the device's bf16 peak is
known, device batch size and its source. --device-batch-size 0 lets nanochat.auto_batch_size
choose; --baseline-batch-size N also runs a fixed batch of N and reports auto / fixed.
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
    parser.add_argument("--compile", default="auto", help="auto (on for cuda) | on | off")
    parser.add_argument("--device", default="", help="cpu, cuda or mps (default: auto)")
    parser.add_argument("--base-dir", default="", help="shared artifacts (data, tokenizer); default NANOCHAT_BASE_DIR")
    parser.add_argument("--data-source", default="", help="a folder of shards or .txt/.jsonl (default: Python's own text)")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")


def _variant(args, device_batch_size: int, total: int) -> dict:
    if total == 0 and device_batch_size == 0:
        total = 16 * args.seq_len
    cfg = BaseTrainConfig(base_dir=args.base_dir, out_dir="", device_type=args.device, depth=args.depth,
                          seq_len=args.seq_len, vocab_size=args.vocab_size, device_batch_size=device_batch_size,
                          total_batch_size=total, num_steps=args.steps, eval_tokens=1, log_every=max(1, args.steps),
                          compile=args.compile, data_source=args.data_source)
    return run_base_train(cfg)


def run(args: argparse.Namespace) -> int:
    if args.steps < 2:
        raise ConfigError(f"bench train --steps: need at least 2 (the first is warm-up), got {args.steps}")
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


if __name__ == "__main__":
    import sys
    from jobs.cli import run_module
    sys.exit(run_module(sys.modules[__name__], None, "python -m jobs.bench_train"))

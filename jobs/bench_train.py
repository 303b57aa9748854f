"""
`python -m jobs bench train`: base-training throughput of a GPT of a given depth on this machine
(real data: the prepared shards and tokenizer under the base dir). Prints one line per variant
and, with --json, one JSON object as the last line: tokens/s, MFU where the device's bf16 peak is
known, device batch size and its source. --device-batch-size 0 lets nanochat.auto_batch_size
choose; --baseline-batch-size N also runs a fixed batch of N and reports auto / fixed.
--compare-precision runs the fp32 step and the `fast` one (bf16 autocast on CUDA and CPUs with AMX,
fp32 elsewhere: nanochat.train_loop.train_precision_route) alternately, --rounds times each, and reports the best
tokens/s of each, their ratio and how far the fast run's final loss is from fp32's (same data, init).
--ranks 1,2 runs the same global batch on 1 and on 2 processes (gloo on CPU, NCCL on CUDA; the CPU's
threads split between the ranks) and reports tokens/s of each; at the largest rank count also the
plain path (overlap: false) and overlapped / plain. On a small CPU this is a smoke figure, not a claim.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

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
    parser.add_argument("--rounds", type=int, default=2, help="alternations of --compare-precision / --ranks; best counts")
    parser.add_argument("--compile", default="auto", help="auto (on for cuda) | on | off")
    parser.add_argument("--device", default="", help="cpu, cuda or mps (default: auto)")
    parser.add_argument("--base-dir", default="", help="shared artifacts (data, tokenizer); default NANOCHAT_BASE_DIR")
    parser.add_argument("--data-source", default="", help="a folder of shards or .txt/.jsonl (default: Python's own text)")
    parser.add_argument("--ranks", default="",
                        help="comma-separated process counts (e.g. 1,2): tokens/s of each at the same global batch")
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
    if args.ranks:
        return _compare_ranks(args)
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


RANK_CHILD = """
import json, sys
from nanochat.base_train import BaseTrainConfig, run
print("ROW " + json.dumps(run(BaseTrainConfig(**json.loads(sys.argv[1]))), default=str), flush=True)
"""


def _train_on_ranks(cfg: dict, ranks: int, threads: int) -> dict:
    """Base training in `ranks` processes on this machine (a gloo/NCCL group); rank 0's result row."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    repo = str(Path(__file__).resolve().parents[1])
    procs = []
    for rank in range(ranks):
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))}
        env["PYTHONPATH"] = os.pathsep.join([repo] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        env["OMP_NUM_THREADS"] = str(threads)
        if ranks > 1:
            env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(ranks), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, "-c", RANK_CHILD, json.dumps(cfg)], env=env, cwd=repo,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=3600)[0])
    finally:
        for p in procs:  # one rank failed or hung: the others would wait in a collective
            if p.poll() is None:
                p.kill()
                p.wait()
    for rank, (p, out) in enumerate(zip(procs, outs)):
        if p.returncode != 0:
            raise RuntimeError(f"bench train --ranks: rank {rank} of {ranks} exited {p.returncode}:\n{out[-3000:]}")
    return json.loads([l for l in outs[0].splitlines() if l.startswith("ROW ")][-1][4:])


def _compare_ranks(args: argparse.Namespace) -> int:
    try:
        counts = sorted({int(r) for r in args.ranks.split(",") if r.strip()})
    except ValueError:
        raise ConfigError(f"bench train --ranks: expected comma-separated integers, got {args.ranks!r}") from None
    if not counts or counts[0] < 1:
        raise ConfigError(f"bench train --ranks: expected positive process counts, got {args.ranks!r}")
    if args.device_batch_size < 1:
        raise ConfigError("bench train --ranks: needs a fixed --device-batch-size (the probe is per rank count)")
    top = counts[-1]
    # the same global batch, data streams and so rows on every rank count: top ranks x one micro-batch
    total = args.total_batch_size or top * args.device_batch_size * args.seq_len
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cfg = dict(base_dir=args.base_dir, out_dir="", device_type=args.device, depth=args.depth, seq_len=args.seq_len,
               vocab_size=args.vocab_size, device_batch_size=args.device_batch_size, total_batch_size=total,
               num_steps=args.steps, eval_tokens=1, log_every=max(1, args.steps), compile=args.compile,
               data_source=args.data_source, precision=args.precision, num_streams=top)
    if args.rounds < 1:
        raise ConfigError(f"bench train --rounds: need at least 1, got {args.rounds}")
    variants = [(n, True) for n in counts] + ([(top, False)] if top > 1 else [])
    out = {"bench": "train", "mode": "ranks", "depth": args.depth, "seq_len": args.seq_len, "steps": args.steps,
           "total_batch_size": total, "cpu_cores": cores, "rounds": args.rounds, "variants": {}}
    best: dict[str, tuple[int, bool, int, dict]] = {}
    for _ in range(args.rounds):  # alternate, so a load change on a shared machine hits every variant
        for n, overlap in variants:
            threads = max(1, cores // n)
            row = _train_on_ranks({**cfg, "overlap": overlap}, n, threads)
            name = f"ranks={n}" + ("" if overlap else " plain")
            if name not in best or row["tokens_per_s"] > best[name][3]["tokens_per_s"]:
                best[name] = (n, overlap, threads, row)
    for name, (n, overlap, threads, row) in best.items():
        out["variants"][name] = {"ranks": n, "overlap": overlap, "threads_per_rank": threads,
                                 "tokens_per_s": row["tokens_per_s"], "grad_accum_steps": row["grad_accum_steps"],
                                 "final_loss": row["final_loss"]}
        print(f"{name:<14} depth={args.depth} T={args.seq_len} B={row['device_batch_size']} "
              f"grad_accum={row['grad_accum_steps']} threads/rank={threads} tok/s={row['tokens_per_s']:,.0f} "
              f"final_loss={row['final_loss']:.4f}", flush=True)
    v = out["variants"]
    base = v[f"ranks={counts[0]}"]["tokens_per_s"]
    for n in counts[1:]:
        out[f"ratio_{n}_vs_{counts[0]}_ranks"] = v[f"ranks={n}"]["tokens_per_s"] / base
        print(f"{n} ranks / {counts[0]}: {out[f'ratio_{n}_vs_{counts[0]}_ranks']:.2f}x tokens/s")
    if top > 1:
        out["ratio_overlap_vs_plain"] = v[f"ranks={top}"]["tokens_per_s"] / v[f"ranks={top} plain"]["tokens_per_s"]
        print(f"overlapped / plain at {top} ranks: {out['ratio_overlap_vs_plain']:.2f}x tokens/s")
    if args.device in ("", "cpu"):
        print(f"(CPU, {cores} cores shared by the ranks, best of {args.rounds} alternations: a smoke figure of the "
              f"multi-process path, not a speed claim)")
    if args.json:
        print(json.dumps(out, sort_keys=True, default=str))
    return 0


if __name__ == "__main__":
    from jobs.command import run_module
    sys.exit(run_module(sys.modules[__name__], None, "python -m jobs.bench_train"))

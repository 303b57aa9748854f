"""
`python -m jobs probe`: find (or read from the cache) the device batch size for a model shape,
the same way every training stage does (nanochat.auto_batch_size). With --json the last line is
one JSON object: batch_size, grad_accum, max_found, trials, seconds, source (probe or cache).
"""
from __future__ import annotations

import argparse
import json

from nanochat.auto_batch_size import DEFAULT_SAFETY_MARGIN, DEFAULT_STOP_GAIN, ProbeConfig, run as run_probe


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--depth", type=int, required=True, help="model depth (width = 64 * depth)")
    parser.add_argument("--seq-len", type=int, required=True, help="tokens per row")
    parser.add_argument("--vocab-size", type=int, default=4096, help="vocabulary size (logits memory grows with it)")
    parser.add_argument("--total-batch-size", type=int, default=0,
                        help="tokens per optimizer step over all ranks (default: 64 rows per rank)")
    parser.add_argument("--world-size", type=int, default=1, help="ranks the training will use")
    parser.add_argument("--memory-budget-gb", type=float, default=0.0,
                        help="CPU: address space the training step may use above the torch runtime "
                             "(default: half the available memory); ignored on GPUs")
    parser.add_argument("--safety-margin", type=float, default=DEFAULT_SAFETY_MARGIN,
                        help="fraction kept free below the largest size that fits (default: %(default)s)")
    parser.add_argument("--stop-gain", type=float, default=DEFAULT_STOP_GAIN,
                        help="stop growing when doubling gains less than this in tokens/s; <0 disables")
    parser.add_argument("--compile", action="store_true", help="probe the torch.compile'd step")
    parser.add_argument("--device", default="", help="cpu, cuda or mps (default: auto)")
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    parser.add_argument("--refresh", action="store_true", help="probe again and overwrite the cache entry")
    parser.add_argument("--cache-dir", default="", help="cache folder (default: <base dir>/batch_size_cache)")
    parser.add_argument("--base-dir", default="", help="shared artifacts folder (default: NANOCHAT_BASE_DIR)")
    parser.add_argument("--out-dir", default="", help="also write the row to OUT_DIR/probe.json")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")


def config_from_args(args: argparse.Namespace) -> ProbeConfig:
    return ProbeConfig(base_dir=args.base_dir, out_dir=args.out_dir, device_type=args.device, depth=args.depth,
                       seq_len=args.seq_len, vocab_size=args.vocab_size, total_batch_size=args.total_batch_size,
                       world_size=args.world_size, compile=args.compile, memory_budget_gb=args.memory_budget_gb,
                       safety_margin=args.safety_margin, stop_gain=args.stop_gain, use_cache=not args.no_cache,
                       refresh_cache=args.refresh, cache_dir=args.cache_dir)


def run(args: argparse.Namespace) -> int:
    row = run_probe(config_from_args(args))
    trials = row["trials"]
    print(f"device_batch_size={row['device_batch_size']} grad_accum={row['grad_accum_steps']} "
          f"(total {row['total_batch_size']} tokens) source={row['batch_size_source']} "
          f"max_found={row['max_found']} trials={len(trials)} in {row['seconds']:.2f} s", flush=True)
    if args.json:
        print(json.dumps({
            "batch_size": row["device_batch_size"], "grad_accum": row["grad_accum_steps"],
            "max_found": row["max_found"], "first_failure": row.get("first_failure"),
            "trials": [{"batch_size": t["batch_size"], "ok": t["ok"]} for t in trials],
            "seconds": round(row["seconds"], 4), "source": row["batch_size_source"],
            "total_batch_size": row["total_batch_size"], "seq_len": row["seq_len"], "depth": row["depth"],
            "device_name": row["device_name"], "memory_budget_gb": row["memory_budget_gb"],
            "cache_key": row["cache_key"],
        }, sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    import sys
    from jobs.cli import run_module
    sys.exit(run_module(sys.modules[__name__], None, "python -m jobs.cmd_probe"))

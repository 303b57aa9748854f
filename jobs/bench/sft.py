"""
`python -m jobs bench sft`: the four SFT modes (eager-dynamic, eager-pack, compile-pad, compile-pack) on
the same conversations, model init and batch size, in one process. Prints a table, then (with --json) one
JSON object as the last line: per mode the three tokens/s figures, the padding fraction, the compile count
and compile seconds (the untimed first step's time beyond an ordinary step; inductor's on-disk cache
can make a repeated compilation nearly free), and three ratios of real tokens/s that attribute the gain
(nanochat.recipes.sft.BENCH_RATIOS): packing (compile-pack / compile-pad, both compiled), compiling
(compile-pack / eager-pack, both packed) and everything (compile-pack / eager-dynamic, the original).
Timings on a shared CPU are noisy: compare ratios from one run, and repeat.
"""
from __future__ import annotations

import argparse
import json

from nanochat.recipes.sft import SFTConfig, bench, bench_ratios
from nanochat.errors import ConfigError
from nanochat.packing import MODES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated modes to run (default: all four)")
    parser.add_argument("--data", default="", help="conversations (JSONL or parquet); default: the offline synthetic set")
    parser.add_argument("--conversations", type=int, default=1000, help="size of the synthetic set")
    parser.add_argument("--init-from", default="", help="checkpoint folder to start from (default: a fresh model)")
    parser.add_argument("--depth", type=int, default=4, help="depth of the fresh model")
    parser.add_argument("--vocab-size", type=int, default=2048, help="vocabulary of the fresh model's tokenizer")
    parser.add_argument("--seq-len", type=int, default=1024, help="seq_len: tokens per row")
    parser.add_argument("--batch-size", type=int, default=4, help="rows per micro-batch (0 = automatic)")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per mode, the first one untimed")
    parser.add_argument("--pack-buffer", type=int, default=512, help="conversations best-fit packing looks at")
    parser.add_argument("--device", default="", help="cpu, cuda or mps (default: auto)")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    cfg = SFTConfig(data_path=args.data, num_conversations=args.conversations, init_from=args.init_from,
                    depth=args.depth, vocab_size=args.vocab_size, seq_len=args.seq_len,
                    device_batch_size=args.batch_size, max_steps=args.steps, pack_buffer=args.pack_buffer,
                    device_type=args.device, seed=args.seed, save_checkpoint=False)
    if args.steps < 2:
        raise ConfigError(f"bench sft --steps: need at least 2 (the first is warm-up), got {args.steps}")
    rows = bench(cfg, modes)
    ratios = bench_ratios(rows)
    summary = {}
    header = f"{'mode':<14} {'tok/s':>10} {'real tok/s':>11} {'sup tok/s':>10} {'padding':>8} {'compiles':>8} {'compile s':>9}"
    print(header)
    for r in rows:
        extra = r["extra"]
        summary[r["variant"]] = {
            "tokens_per_s": r["tokens_per_s"], "real_tokens_per_s": r["real_tokens_per_s"],
            "supervised_tokens_per_s": r["supervised_tokens_per_s"], "padding_fraction": r["padding_fraction"],
            "num_compiles": r["num_compiles"], "compile_seconds": extra["compile_seconds"],
            "warmup_seconds": extra["warmup_seconds"],
            "timed_steps": extra["timed_steps"], "device_batch_size": r["device_batch_size"],
            "final_loss": r["final_loss"],
        }
        print(f"{r['variant']:<14} {r['tokens_per_s'] or 0:>10.0f} {r['real_tokens_per_s'] or 0:>11.0f} "
              f"{r['supervised_tokens_per_s'] or 0:>10.0f} {r['padding_fraction'] or 0:>8.3f} "
              f"{r['num_compiles']:>8d} {extra['compile_seconds']:>9.1f}")
    labels = {"compile-pack/compile-pad": "packing (both compiled)", "compile-pack/eager-pack": "compiling (both packed)",
              "compile-pack/eager-dynamic": "everything vs the original"}
    for name, value in ratios.items():
        print(f"real tokens/s {name}: {value:.2f}x  ({labels.get(name, name)})")
    first = rows[0]
    if args.json:
        print(json.dumps({"command": "bench sft", "device": first["device_name"], "depth": first["depth"],
                          "seq_len": first["seq_len"], "device_batch_size": first["device_batch_size"],
                          "steps": args.steps, "modes": summary, "ratios": ratios}, sort_keys=True))
    failed = [r["variant"] for r in rows if r["state"] != "COMPLETED"]
    return 1 if failed else 0

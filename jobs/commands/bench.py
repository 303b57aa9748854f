"""
`python -m jobs bench train|sft|inference|batch|all [options]`: each optimization against its
baseline on this machine. Dispatches to jobs.bench.train, jobs.bench.sft, jobs.bench.inference and
jobs.bench.batch (each has add_arguments(parser) and run(args) -> int); `all` runs them in turn with
their defaults and fails if any fails.
"""
from __future__ import annotations

import argparse
import importlib
import sys

BENCHES = {
    "train": ("jobs.bench.train", "automatic device batch size vs a fixed one; --compare-precision: fp32 vs bf16 step; --compare-cpu-step: fp32 eager vs compiled/bf16 CPU steps"),
    "sft": ("jobs.bench.sft", "SFT: eager dynamic shapes vs compiled fixed shapes (packing)"),
    "inference": ("jobs.bench.inference", "generation with and without the KV cache; int8 CPU decode; 8 samples vs 1"),
    "batch": ("jobs.bench.batch", "automatic device batch size: the search, a cache hit, and the earlier fork's 85% rule"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", required=True, metavar="WHICH")
    for name, (module_name, help_text) in BENCHES.items():
        p = sub.add_parser(name, help=help_text.replace("%", "%%"))  # argparse %-formats help
        p.set_defaults(bench_module=module_name)
        try:
            importlib.import_module(module_name).add_arguments(p)
        except ImportError as e:
            p.set_defaults(bench_missing=str(e))
    p = sub.add_parser("all", help="every benchmark in turn, with its defaults")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")


def _run_one(name: str, argv: list[str]) -> int:
    from jobs.command import run_module_named
    module_name, help_text = BENCHES[name]
    return run_module_named(module_name, argv, f"python -m jobs bench {name}", help_text)


def run(args) -> int:
    if args.bench != "all":
        if getattr(args, "bench_missing", None):
            print(f"bench {args.bench}: not available ({args.bench_missing})", file=sys.stderr)
            return 2
        return int(importlib.import_module(args.bench_module).run(args) or 0)
    worst = 0
    results = {}
    for name in BENCHES:
        print(f"== bench {name} ==", flush=True)
        rc = _run_one(name, ["--json"] if args.json else [])
        results[name] = rc
        worst = max(worst, rc)
    if args.json:
        import json
        print(json.dumps({"bench": "all", "exit_codes": results}, sort_keys=True))
    return worst

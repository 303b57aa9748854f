"""
`python -m jobs report RUN [RUN ...] [--latest] [--baseline RUN] [--json] [--price-per-gpu-hour X]`:
each run's report.csv, summary.md and plots in its folder, and with several runs (or --baseline) their
comparison (jobs.report.build_report).
"""
from __future__ import annotations

import argparse
import json

from jobs.report import build_report
from jobs.report.load import latest_run
from jobs.report.rows import DEFAULT_PRICE_PER_GPU_HOUR
from jobs.runs import results_root
from nanochat.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="*", metavar="RUN", help="run id under --results-dir, or a path to a run folder")
    parser.add_argument("--latest", action="store_true", help="report the most recent run under --results-dir")
    parser.add_argument("--baseline", metavar="RUN", help="compare every RUN against this run (ratios)")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument("--price-per-gpu-hour", type=float, default=DEFAULT_PRICE_PER_GPU_HOUR, metavar="X",
                        help=f"dollars per GPU-hour for the cost column (default {DEFAULT_PRICE_PER_GPU_HOUR})")
    parser.add_argument("--results-dir", default=None, metavar="DIR",
                        help="where runs live (default $NANOCHAT_RESULTS_DIR, else <repo>/results; "
                             "./results for an installed copy)")
    parser.add_argument("--out", metavar="DIR", help="folder for the comparison of several runs "
                        "(default <results-dir>/compare/<baseline>_vs_<runs>)")
    parser.add_argument("--no-sacct", action="store_true", help="do not ask Slurm accounting")


def run(args: argparse.Namespace) -> int:
    runs = list(args.runs)
    if args.latest:
        runs.append(latest_run(args.results_dir or results_root()))
    if not runs and not args.baseline:
        raise ConfigError("report: name a RUN, or pass --latest")
    report = build_report(runs, args.results_dir, baseline=args.baseline,
                          price_per_gpu_hour=args.price_per_gpu_hour, use_sacct=not args.no_sacct,
                          out_dir=args.out)
    for run_id, files in report.files.items():
        print(f"{run_id}: {files['summary_md']}")
    for p in report.problems:
        print(f"problem: {p.run_id} {p.path}: {p.kind}: {p.detail}")
    if args.json:
        print(json.dumps(report.to_json(), default=str))
    return 0


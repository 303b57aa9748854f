"""
`python -m jobs probe`: find (or read from the cache) the device batch size for a model shape,
the same way every training stage does (nanochat.training.batch_size). With --json the last line is
one JSON object: batch_size, grad_accum, max_found, trials, seconds, source (probe or cache).
"""
from __future__ import annotations

import argparse
import json

from nanochat.training.batch_size.options import DEFAULT_SAFETY_MARGIN, DEFAULT_STOP_GAIN
from nanochat.recipes.probe import ProbeConfig, run as run_probe
from nanochat.errors import ConfigError


SHAPE_FLAGS = {"depth": None, "seq_len": None, "vocab_size": 4096, "total_batch_size": 0, "world_size": 1, "compile": False}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pipeline", default="",
                        help="probe for a training stage of this pipeline (a path or a name in pipelines/): "
                             "shape, world size and compile come from that stage, so the entry is the one it reads")
    parser.add_argument("--serves", default="", help="with --pipeline: the training stage (default: the "
                                                     "stage the pipeline's probe stage serves)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="with --pipeline: override a pipeline key, as `submit --set` does (e.g. defaults.depth=26)")
    parser.add_argument("--executor", choices=("slurm", "local"), default="slurm",
                        help="with --pipeline: how the training will run (local runs use one rank)")
    parser.add_argument("--depth", type=int, default=None, help="model depth (width = 64 * depth)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per row")
    parser.add_argument("--vocab-size", type=int, default=4096, help="vocabulary size (logits memory grows with it)")
    parser.add_argument("--total-batch-size", type=int, default=0,
                        help="tokens per optimizer step over all ranks (default: 64 rows per rank)")
    parser.add_argument("--world-size", type=int, default=1, help="ranks the training will use")
    parser.add_argument("--time-limit-s", type=float, default=0.0,
                        help="stop searching after this many seconds and keep the best size found (0: no limit)")
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
    common = dict(base_dir=args.base_dir, out_dir=args.out_dir, memory_budget_gb=args.memory_budget_gb,
                  safety_margin=args.safety_margin, stop_gain=args.stop_gain, use_cache=not args.no_cache,
                  refresh_cache=args.refresh, cache_dir=args.cache_dir, time_limit_s=args.time_limit_s)
    if not args.pipeline:
        for flag in ("serves", "sets"):
            if getattr(args, flag):
                raise ConfigError(f"--{'set' if flag == 'sets' else flag}: only with --pipeline")
        for flag in ("depth", "seq_len"):
            if getattr(args, flag) is None:
                raise ConfigError(f"--{flag.replace('_', '-')}: required (or --pipeline P to take the shape from a training stage)")
        return ProbeConfig(device_type=args.device, depth=args.depth, seq_len=args.seq_len, vocab_size=args.vocab_size,
                           total_batch_size=args.total_batch_size, world_size=args.world_size, compile=args.compile,
                           **common)
    from jobs.spec import load_pipeline, resolve_pipeline_path
    from jobs.stages import probe_args
    from nanochat.files import get_base_dir
    for flag, default in SHAPE_FLAGS.items():
        if getattr(args, flag) != default:
            raise ConfigError(f"--{flag.replace('_', '-')}: not with --pipeline (the shape comes from the training "
                              f"stage; change it with --set, e.g. --set defaults.depth=26)")
    pipeline = load_pipeline(resolve_pipeline_path(args.pipeline), args.sets)
    serves = args.serves or next((s.args.get("serves") for s in pipeline.stages.values()
                                  if s.kind == "probe" and s.args.get("serves")), "")
    if not serves:
        raise ConfigError(f"--serves: {pipeline.source} has no probe stage with `serves`; name the training stage")
    if serves not in pipeline.stages or pipeline.stages[serves].kind not in ("base_train", "mid_train"):
        raise ConfigError(f"--serves {serves}: not a base_train or mid_train stage of {pipeline.source}")
    run = {"run_id": "probe", "workdir": str(args.base_dir or get_base_dir()), "executor": args.executor}
    derived = probe_args(run, pipeline, None, {"serves": serves})
    if args.device:
        derived["device_type"] = args.device
    return ProbeConfig(serves=serves, **derived, **common)


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
            "trials": [{"batch_size": t["batch_size"], "ok": t["ok"], "phase": t.get("phase", "memory")} for t in trials],
            "seconds": round(row["seconds"], 4), "source": row["batch_size_source"],
            "total_batch_size": row["total_batch_size"], "seq_len": row["seq_len"], "depth": row["depth"],
            "device_name": row["device_name"], "memory_budget_gb": row["memory_budget_gb"],
            "cache_key": row["cache_key"], "baseline_batch_size": row.get("baseline_batch_size"),
            "stopped_by_deadline": row.get("stopped_by_deadline"), "compile_confirmed": row.get("compile_confirmed"),
            "serves": row.get("serves"),
        }, sort_keys=True), flush=True)
    return 0

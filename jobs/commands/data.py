"""
`python -m jobs data fetch|plan ...`: the datasets of a run, by hand and at submit.

    data fetch climbmix-400b --shards 170           pretraining shards into <base_dir>/data/<set>/
    data fetch smoltalk mmlu gsm8k                   conversation sets, converted to <base_dir>/data/chat/<set>.jsonl
    data fetch --evals core,arc_easy                 evaluation sets into <base_dir>/eval_data/ (--evals all: every one)
    data fetch artemis-a100                          every `data` stage of a pipeline, here (the login node)
    data plan artemis-a100                           sets, shards, bytes, tokens, and the epochs each
                                                     training stage makes over its data (no network)

On clusters whose compute nodes have no internet, run `data fetch PIPELINE` on the login node
before `submit`: the pipeline's own data stage then finds everything present and does no network work.

The plan itself (and submit's data check) is jobs.data_plan.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time

from jobs.data_plan import check_sources, format_plan, plan_pipeline, stage_config
from nanochat.errors import ConfigError
from nanochat.files import get_base_dir


def add_arguments(p) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    f = sub.add_parser("fetch", help="fetch and verify datasets (sets by name, or a pipeline's data stages)")
    f.add_argument("names", nargs="*", help="pretraining set, conversation sets, or one pipeline (name or path)")
    f.add_argument("--shards", type=int, default=0, help="pretraining shards incl. the validation shard")
    f.add_argument("--evals", default="", help="evaluation sets, comma-separated (core, arc_easy, arc_challenge, "
                                               "mmlu, gsm8k, humaneval) or all")
    f.add_argument("--workers", type=int, default=8, help="parallel downloads (default: %(default)s)")
    f.add_argument("--retries", type=int, default=5, help="attempts per file, with exponential backoff (default: %(default)s)")
    f.add_argument("--base-dir", default="", help="work directory (default: NANOCHAT_BASE_DIR or ~/.cache/nanochat)")
    f.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a pipeline value, as in submit")
    f.add_argument("--json", action="store_true")
    q = sub.add_parser("plan", help="print the data plan of a pipeline (no network)")
    q.add_argument("pipeline", nargs="?", default=None)
    q.add_argument("--base-dir", default="")
    q.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    q.add_argument("--json", action="store_true")


def _fetch(args) -> int:
    from jobs import spec
    from nanochat import fetch
    from nanochat.recipes.data import DataConfig, run as run_data
    from nanochat.datasets_chat import CHAT_SETS
    from nanochat.eval_data import EVAL_SETS
    base_dir = args.base_dir or str(get_base_dir())
    t0 = time.perf_counter()
    names = args.names
    evals = list(EVAL_SETS) if args.evals == "all" else [e.strip() for e in args.evals.split(",") if e.strip()]
    unknown = [e for e in evals if e not in EVAL_SETS]
    if unknown:
        raise ConfigError(f"--evals: unknown evaluation set {unknown[0]!r} (known: {', '.join(EVAL_SETS)}, or all)")
    if not names and not evals:
        raise ConfigError("data fetch: name sets, a pipeline, or --evals")
    known = set(fetch.PRETRAINING_SETS) | set(CHAT_SETS)
    results = []
    if len(names) == 1 and names[0] not in known:   # a pipeline: run its data stages here
        pipeline = spec.load_pipeline(spec.resolve_pipeline_path(names[0]), args.sets)
        plan_pipeline(pipeline, base_dir)
        stages = [s for s in pipeline.stages.values() if s.kind == "data"]
        if not stages:
            raise ConfigError(f"{pipeline.source}: no stage of kind `data` to fetch")
        for s in stages:
            cfg = stage_config(s)
            results.append(run_data(dataclasses.replace(cfg, base_dir=base_dir, workers=args.workers,
                                                        retries=args.retries)))
    else:
        unknown = [x for x in names if x not in known]
        if unknown:
            raise ConfigError(f"{unknown[0]}: unknown set (known: {', '.join(sorted(known))}; or one pipeline name)")
        pre = [x for x in names if x in fetch.PRETRAINING_SETS]
        if len(pre) > 1:
            raise ConfigError(f"{pre[1]}: fetch one pretraining set at a time")
        if pre and args.shards <= 0:
            raise ConfigError(f"--shards: give the number of {pre[0]} shards (incl. the validation shard)")
        results.append(run_data(DataConfig(pretraining=pre[0] if pre else "", num_shards=args.shards,
                                           conversations=[x for x in names if x in CHAT_SETS], evals=evals,
                                           workers=args.workers, retries=args.retries, base_dir=base_dir)))
    seconds = time.perf_counter() - t0
    files = sum(r.get("files", 0) for r in results)
    fetched = sum(r.get("fetched", 0) for r in results)
    sets = sum(len(r.get("sets", [])) for r in results)
    print(f"data: {sets} sets, {files} files present ({fetched} fetched) in {seconds:.2f} s", flush=True)
    if args.json:
        print(json.dumps({"results": results, "seconds": round(seconds, 3)}, sort_keys=True, default=str))
    return 0


def run(args) -> int:
    from jobs import spec
    from nanochat.fetch import FetchError
    if args.action == "fetch":
        try:
            return _fetch(args)
        except FetchError as e:   # the work failed (network, a file that never verified): one line, exit 1
            print(f"error: {e}", file=sys.stderr)
            return 1
    pipeline = spec.load_pipeline(spec.resolve_pipeline_path(args.pipeline), args.sets)
    plan = plan_pipeline(pipeline, args.base_dir, fill=True)
    print(format_plan(plan), flush=True)
    check_sources(pipeline, plan["sources"])    # what submit would refuse: exit 2, one line
    if args.json:
        print(json.dumps(plan, sort_keys=True, default=str))
    return 0


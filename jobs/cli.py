"""
`python -m jobs <command>` (also installed as `nanochat-jobs`).

    submit PIPELINE [--executor auto|slurm|local] [--set KEY=VALUE ...] [--wait] [--json] [--run-id ID]
                    [--max-parallel N]
    status RUN [--json]          cancel RUN [--json]          resume RUN [--wait] [--json] [--max-parallel N]
    report RUN [RUN ...] [--baseline RUN] [--json]              (jobs.report)
    probe ... (jobs.cmd_probe)   chat ... (jobs.cmd_chat)     bench train|sft|inference|batch|all (jobs.cmd_bench)
    stage-run RUN_DIR STAGE [--task I]                          (internal: what a local stage process runs)

Every command module is imported when its command runs, so `--help` is fast and a module that is
missing or broken only affects its own command. Exit codes: 0 ok, 1 the work failed, 2 bad input
(nanochat.common.ConfigError: one line on stderr naming the file and the key).
With --json the last line of standard output is one JSON object.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time

# command -> module providing add_arguments(parser) and run(args) -> int
EXTERNAL_COMMANDS = {
    "report": ("jobs.report", "build the report of one or more runs (CSV, Markdown summary, plots)"),
    "probe": ("jobs.cmd_probe", "find the largest device batch size that fits (and cache it)"),
    "chat": ("jobs.cmd_chat", "chat with a trained checkpoint"),
    "eval": ("jobs.cmd_eval", "evaluate a checkpoint: CORE (--tasks core) or the chat tasks, a report card"),
    "bench": ("jobs.cmd_bench", "benchmark each optimization against its baseline: train|sft|inference|batch|all"),
}


def _default_max_parallel() -> int:
    # a stage on a small machine wants every core; parallel stages only help on a bigger one
    return 1 if (os.cpu_count() or 1) <= 8 else 2


def add_submit_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("pipeline", nargs="?", default=None,
                   help="pipeline spec: a path or a name in pipelines/ (default: pipelines/smoke.yaml)")
    p.add_argument("--executor", choices=["auto", "slurm", "local"], default="auto",
                   help="auto: Slurm when sbatch is on PATH and sinfo answers, else local processes")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec value (YAML-parsed): STAGE.arg=v, STAGE.resources.time_min=v, "
                        "defaults.arg=v, cluster.partition=x, results_dir=path")
    p.add_argument("--wait", action="store_true", help="Slurm: follow the run to its end (local runs always do)")
    p.add_argument("--run-id", default=None, help="name the run (default: <pipeline>-<UTC time>-<random>)")
    p.add_argument("--max-parallel", type=int, default=_default_max_parallel(),
                   help="local executor: most stage processes at once (default: %(default)s here)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")


def _emit(args, obj: dict) -> None:
    obj = {**obj, **getattr(args, "json_extra", {})}
    if getattr(args, "json", False):
        print(json.dumps(obj, sort_keys=True, default=str), flush=True)


def _run_stages(args, run: dict, run_dir, pipeline, todo: list[str], tasks: dict, executor: str) -> int:
    from jobs import runs, submit
    if executor == "slurm":
        t0 = time.perf_counter()
        records = submit.submit_slurm(run, run_dir, pipeline, todo, tasks)
        dt = time.perf_counter() - t0
        print(f"submitted {len(records)} stage(s) to Slurm in {dt:.2f} s: "
              + ", ".join(f"{n}={r['job_id']}" for n, r in records.items()), flush=True)
        print(f"run {run['run_id']}: {run_dir}\n  follow: python -m jobs status {run['run_id']}", flush=True)
        result = {"run_id": run["run_id"], "run_dir": str(run_dir), "executor": "slurm",
                  "submit_seconds": round(dt, 3), "jobs": {n: r["job_id"] for n, r in records.items()}}
        if not args.wait:
            result["state"] = "SUBMITTED"
            _emit(args, result)
            return 0
        status = runs.wait_for_run(run_dir, progress=lambda m: print(m, flush=True))
    else:
        print(f"run {run['run_id']} (local, at most {args.max_parallel} at once): {run_dir}", flush=True)
        t0 = time.perf_counter()
        submit.run_local(run, run_dir, pipeline, todo, max_parallel=max(1, args.max_parallel), tasks=tasks,
                         progress=lambda m: print(m, flush=True))
        print(f"local run finished in {time.perf_counter() - t0:.1f} s", flush=True)
        result = {"run_id": run["run_id"], "run_dir": str(run_dir), "executor": "local",
                  "wall_seconds": round(time.perf_counter() - t0, 1)}
        status = runs.run_status(run_dir)
    print(runs.format_status(status), flush=True)
    _write_report(run_dir)
    result.update(state=status["state"], stages={n: s["state"] for n, s in status["stages"].items()})
    _emit(args, result)
    return 0 if status["state"] == "COMPLETED" else 1


def _write_report(run_dir) -> None:
    """Build the run's report when jobs.report is there; a report problem never fails the run."""
    try:
        report = importlib.import_module("jobs.report")
        report.build_report([run_dir])
        print(f"report: {run_dir}", flush=True)
    except Exception as e:  # the report is a convenience here; `python -m jobs report RUN` shows errors
        print(f"(report not built: {type(e).__name__}: {e})", file=sys.stderr, flush=True)


def cmd_submit(args) -> int:
    from jobs import runs, spec, submit
    path = spec.resolve_pipeline_path(args.pipeline)
    pipeline = spec.load_pipeline(path, args.sets)       # validates everything before any submission
    executor = submit.choose_executor(args.executor)
    if args.max_parallel < 1:
        raise spec.ConfigError(f"--max-parallel {args.max_parallel}: must be at least 1")
    run, run_dir = runs.create_run(pipeline, args.run_id, executor, args.sets)
    return _run_stages(args, run, run_dir, pipeline, list(pipeline.stages), {}, executor)


def cmd_status(args) -> int:
    from jobs import runs
    status = runs.run_status(runs.find_run(args.run))
    print(runs.format_status(status), flush=True)
    _emit(args, status)
    return 0


def cmd_cancel(args) -> int:
    from jobs import runs
    run_dir = runs.find_run(args.run)
    done = runs.cancel_run(run_dir)
    print(f"cancelled: {', '.join(done) if done else 'nothing was running'}", flush=True)
    _emit(args, {"run_dir": str(run_dir), "cancelled": done})
    return 0


def cmd_resume(args) -> int:
    from jobs import runs, submit
    run_dir = runs.find_run(args.run)
    run, pipeline, todo, tasks = runs.resume_plan(run_dir)
    if not todo:
        print(f"run {run['run_id']}: every stage already completed", flush=True)
        _emit(args, {"run_id": run["run_id"], "run_dir": str(run_dir), "state": "COMPLETED", "resubmitted": []})
        return 0
    executor = submit.choose_executor(args.executor or run.get("executor", "auto"))
    runs.clear_cancel_flag(run_dir)
    print(f"resuming {run['run_id']}: {', '.join(todo)} (completed stages keep their outputs)", flush=True)
    args.json_extra = {"resubmitted": todo}
    return _run_stages(args, run, run_dir, pipeline, todo, tasks, executor)


def cmd_stage_run(args) -> int:
    from jobs.stages import main_stage_run
    return main_stage_run(args.run_dir, args.stage, args.task)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jobs",
                                     description="nanochat on Slurm: submit and follow the staged pipeline.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("submit", help="submit a pipeline (Slurm, or local processes where there is no Slurm)")
    add_submit_arguments(p)
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("status", help="each stage's state, elapsed time, job id and log")
    p.add_argument("run", help="run id or run folder")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("cancel", help="cancel a run's jobs (scancel, or stop local processes)")
    p.add_argument("run", help="run id or run folder")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("resume", help="resubmit only the stages that have not completed")
    p.add_argument("run", help="run id or run folder")
    p.add_argument("--executor", choices=["auto", "slurm", "local"], default=None,
                   help="default: the executor the run was submitted with")
    p.add_argument("--wait", action="store_true")
    p.add_argument("--max-parallel", type=int, default=_default_max_parallel())
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser("stage-run", help="(internal) run one stage of a run folder here")
    p.add_argument("run_dir")
    p.add_argument("stage")
    p.add_argument("--task", type=int, default=None, help="array task index (variant) for stages with variants")
    p.set_defaults(func=cmd_stage_run)

    for name, (module, help_text) in EXTERNAL_COMMANDS.items():
        p = sub.add_parser(name, help=help_text, add_help=False)
        p.set_defaults(func=None, external=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # External commands parse their own arguments with their module's parser.
    if argv and argv[0] in EXTERNAL_COMMANDS:
        module_name, help_text = EXTERNAL_COMMANDS[argv[0]]
        return run_module_named(module_name, argv[1:], f"python -m jobs {argv[0]}", help_text)
    args = parser.parse_args(argv)
    return _call(lambda: args.func(args))


def run_module_named(module_name: str, argv: list[str] | None, prog: str, description: str | None = None) -> int:
    """run_module for a module imported by name; a module that cannot be imported is exit code 2."""
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        print(f"{prog}: not available ({e})", file=sys.stderr)
        return 2
    return run_module(module, argv, prog, description)


def run_module(module, argv: list[str] | None, prog: str, description: str | None = None) -> int:
    """Parse argv with the module's add_arguments and call its run(args), with the command line's
    exit codes (2 for a ConfigError). Every command module's own `python -m` entry uses it too."""
    parser = argparse.ArgumentParser(prog=prog, description=description or (module.__doc__ or "").strip().split("\n")[0])
    module.add_arguments(parser)
    args = parser.parse_args(argv)
    return _call(lambda: module.run(args))


def _call(fn) -> int:
    try:
        rc = fn()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        from nanochat.common import ConfigError
        if isinstance(e, ConfigError):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())

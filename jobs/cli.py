"""
`python -m jobs <command>` (also installed as `nanochat-jobs`).

    submit PIPELINE [--executor auto|slurm|local] [--set KEY=VALUE ...] [--wait] [--json] [--run-id ID]
                    [--max-parallel N] [--dry-run]
    status RUN [--watch] [--json] cancel RUN [--json]          logs RUN [STAGE] [--follow] [--task N]
    resume RUN [--wait] [--json] [--max-parallel N]
    report RUN [RUN ...] [--baseline RUN] [--json]              (jobs/commands/report.py; the report: jobs/report/)
    probe ...   chat ...   data fetch|plan ...   eval ...   bench train|sft|inference|batch|all   (jobs/commands/)
    gpu-check [--out FILE] (every GPU path, short; one line and exit 0 without CUDA)
    rehearse PIPELINE (the pipeline as shipped, scaled down, on the local Slurm, a local hub)
    stage-run RUN_DIR STAGE [--task I]                          (internal: what a local stage process runs)

Every command module is imported when its command runs, so `--help` is fast and a module that is
missing or broken only affects its own command. Exit codes: 0 ok, 1 the work failed (also an
OSError such as a full disk, and a report that could not be written: one line naming the file),
2 bad input (nanochat.errors.ConfigError, argparse errors: one line on stderr naming the file and
the key), 130 Ctrl-C, 128+N stopped by signal N. `status` exits 1 once the run ended FAILED or CANCELLED.
With --json the last line of standard output is one JSON object; a failing command's has "error"
and "exit_code".
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time

from jobs.command import ArgumentParser, UsageError, call_with_exit_codes, print_failure, run_module_named
from nanochat.errors import one_line

# command -> module providing add_arguments(parser) and run(args) -> int
EXTERNAL_COMMANDS = {
    "report": ("jobs.commands.report", "build the report of one or more runs (CSV, Markdown summary, plots)"),
    "probe": ("jobs.commands.probe", "find the largest device batch size that fits (and cache it)"),
    "chat": ("jobs.commands.chat", "chat with a trained checkpoint"),
    "data": ("jobs.commands.data", "fetch and verify datasets (fetch), or print a pipeline's data plan (plan)"),
    "eval": ("jobs.commands.eval", "evaluate a checkpoint: CORE (--tasks core) or the chat tasks, a report card"),
    "logs": ("jobs.commands.logs", "a stage's stdout/stderr (Slurm or local), earlier attempts first; --follow, --task N"),
    "bench": ("jobs.commands.bench", "benchmark each optimization against its baseline: train|sft|inference|batch|all"),
    "gpu-check": ("jobs.commands.gpu_check", "check every GPU path on this machine's CUDA device, one JSON line (skips without CUDA)"),
    "rehearse": ("jobs.commands.rehearse", "a pipeline as shipped, scaled down, on the local two-node Slurm with a local hub"),
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
    p.add_argument("--dry-run", action="store_true",
                   help="validate and print per stage the sbatch script, resources, dependencies, outputs, logs "
                        "and the data plan (and sbatch --test-only's answer where Slurm answers); submit nothing")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")


def _emit(args, obj: dict, exit_code: int = 0) -> int:
    """Print the command's JSON object (with --json) and return its exit code. A failing command's
    object carries "error" (one line) and "exit_code", like the one call_with_exit_codes prints for an exception."""
    obj = {**obj, **getattr(args, "json_extra", {}), "exit_code": exit_code}
    if exit_code and not obj.get("error"):
        obj["error"] = f"run {obj.get('state', 'failed')}"
    if getattr(args, "json", False):
        print(json.dumps(obj, sort_keys=True, default=str), flush=True)
    return exit_code


def _run_stages(args, run: dict, run_dir, pipeline, todo: list[str], tasks: dict, executor: str) -> int:
    from jobs import progress, runs, submit
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
            return _emit(args, result)
        with progress.Watcher(run_dir, progress.use_live(args.json), poll_s=5.0) as watch:
            status = runs.wait_for_run(run_dir, progress=watch.print,
                                       on_status=lambda st: setattr(watch, "latest_status", st))
    else:
        print(f"run {run['run_id']} (local, at most {args.max_parallel} at once): {run_dir}", flush=True)
        t0 = time.perf_counter()
        with progress.Watcher(run_dir, progress.use_live(args.json), poll_s=1.0) as watch:
            submit.run_local(run, run_dir, pipeline, todo, max_parallel=max(1, args.max_parallel), tasks=tasks,
                             progress=watch.print)
        print(f"local run finished in {time.perf_counter() - t0:.1f} s", flush=True)
        result = {"run_id": run["run_id"], "run_dir": str(run_dir), "executor": "local",
                  "wall_seconds": round(time.perf_counter() - t0, 1)}
        status = runs.run_status(run_dir)
    print(runs.format_status(status), flush=True)
    result.update(state=status["state"], stages={n: s["state"] for n, s in status["stages"].items()})
    error = runs.first_error(status)
    report_error = _write_report(run_dir)
    if report_error:
        error = f"{error}; {report_error}" if error else report_error
        print(f"error: {report_error}", file=sys.stderr, flush=True)
    if error:
        result["error"] = error
    return _emit(args, result, 0 if status["state"] == "COMPLETED" and not report_error else 1)


def _write_report(run_dir) -> str | None:
    """Build the run's report; the one-line reason when it could not be (a full disk): a run
    without its report has not done all its work, so the command exits 1 (jobs.report names the file)."""
    try:
        report = importlib.import_module("jobs.report")
        report.build_report([run_dir])
        print(f"report: {run_dir}", flush=True)
        return None
    except Exception as e:
        return f"report not built: {one_line(e)}"


def cmd_submit(args) -> int:
    from jobs import runs, spec, submit
    path = spec.resolve_pipeline_path(args.pipeline)
    pipeline = spec.load_pipeline(path, args.sets)       # validates everything before any submission
    if not getattr(args, "dry_run", False):    # the dry run checks (and prints) the data plan itself
        importlib.import_module("jobs.data_plan").check_pipeline_data(pipeline)   # shard counts, epochs over the data
    executor = submit.choose_executor(args.executor)
    if args.max_parallel < 1:
        raise spec.ConfigError(f"--max-parallel {args.max_parallel}: must be at least 1")
    if getattr(args, "dry_run", False):
        from jobs import dryrun
        plan = dryrun.dry_run(pipeline, runs.checked_run_id(pipeline, args.run_id), executor, args.max_parallel)
        return _emit(args, plan)
    run, run_dir = runs.create_run(pipeline, args.run_id, executor, args.sets)
    return _run_stages(args, run, run_dir, pipeline, list(pipeline.stages), {}, executor)


def cmd_status(args) -> int:
    from jobs import progress, runs
    run_dir = runs.find_run(args.run)
    if args.watch:      # follow the run to its end, its stage lines refreshed
        with progress.Watcher(run_dir, progress.use_live(args.json), poll_s=args.interval) as watch:
            while True:
                watch.latest_status = status = runs.run_status(run_dir)
                if all(s["state"] in runs.TERMINAL or s["state"] == "NOT_SUBMITTED" for s in status["stages"].values()):
                    break
                time.sleep(args.interval)
    status = runs.run_status(run_dir)
    print(runs.format_status(status), flush=True)
    run, pipeline, _ = runs.load_run(run_dir)
    lines = progress.stage_lines(run, pipeline, status)
    if not args.watch and any(ln["step"] is not None for ln in lines):
        print("progress:\n" + "\n".join(progress.plain_line(ln) for ln in lines), flush=True)
    status["progress"] = lines
    error = runs.first_error(status)
    code = runs.status_exit_code(status)      # 1 once the run ended FAILED or CANCELLED
    return _emit(args, {**status, **({"error": error} if code and error else {})}, code)


def cmd_cancel(args) -> int:
    from jobs import runs
    run_dir = runs.find_run(args.run)
    done = runs.cancel_run(run_dir)
    print(f"cancelled: {', '.join(done) if done else 'nothing was running'}", flush=True)
    return _emit(args, {"run_dir": str(run_dir), "cancelled": done})


def cmd_resume(args) -> int:
    from jobs import runs, submit
    run_dir = runs.find_run(args.run)
    run, pipeline, todo, tasks = runs.resume_plan(run_dir)
    if not todo:
        print(f"run {run['run_id']}: every stage already completed", flush=True)
        return _emit(args, {"run_id": run["run_id"], "run_dir": str(run_dir), "state": "COMPLETED", "resubmitted": []})
    executor = submit.choose_executor(args.executor or run.get("executor", "auto"))
    runs.clear_cancel_flag(run_dir)
    print(f"resuming {run['run_id']}: {', '.join(todo)} (completed stages keep their outputs)", flush=True)
    args.json_extra = {"resubmitted": todo}
    return _run_stages(args, run, run_dir, pipeline, todo, tasks, executor)


def cmd_stage_run(args) -> int:
    from jobs.stages import main_stage_run
    from jobs.processes import Terminated, follow_driver, stop_own_group
    follow_driver()      # a local stage ends with its driver, and writes its row when stopped
    try:
        return main_stage_run(args.run_dir, args.stage, args.task)
    except Terminated as e:
        return 128 + e.signum
    finally:
        stop_own_group()


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m jobs",
                                     description="nanochat on Slurm: submit and follow the staged pipeline.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("submit", help="submit a pipeline (Slurm, or local processes where there is no Slurm)")
    add_submit_arguments(p)
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("status", help="each stage's state, elapsed time, job id, log and progress (step, loss, tok/s, ETA)")
    p.add_argument("run", help="run id or run folder")
    p.add_argument("--watch", action="store_true",
                   help="follow the run to its end: stage lines refreshed in place on a terminal, plain lines otherwise")
    p.add_argument("--interval", type=float, default=5.0, help="--watch: seconds between polls (default 5)")
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
    try:
        args = parser.parse_args(argv)
    except UsageError as e:
        return print_failure(str(e), 2, "--json" in argv)
    return call_with_exit_codes(lambda: args.func(args), getattr(args, "json", False))


if __name__ == "__main__":
    sys.exit(main())

"""
`python -m jobs logs RUN [STAGE] [--task N] [--rank R] [--follow] [--json]`: a stage's stdout and stderr.

Where they are: a Slurm stage's in its submitit folder (<workdir>/<run>/submitit/<stage>/, one
.out and one .err per job and rank, named by submitit.core.utils.JobPaths); a local stage's in the
run folder's logs/ (stdout and stderr together). Earlier attempts come first, each under a header:
a requeued Slurm job appends to its own files (sbatch --open-mode=append, each attempt starts with
submitit's "Starting with JobEnvironment" line), and a `resume` submits a new job, whose id
jobs.json keeps after the earlier ones (previous_job_ids); a resumed local stage appends to its log.

Without STAGE: the first stage that failed, else one that runs, else the last one that ran.
--follow prints what the files gain until the stage has ended (Ctrl-C stops it sooner).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from nanochat.errors import ConfigError


def add_arguments(p) -> None:
    p.add_argument("run", help="run id or run folder")
    p.add_argument("stage", nargs="?", default=None,
                   help="stage name (default: the first that failed, else one running, else the last that ran)")
    p.add_argument("--task", type=int, default=None, help="array task (variant index) of a stage with variants (default 0)")
    p.add_argument("--rank", type=int, default=0, help="Slurm: the task rank of a multi-task job (default 0)")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing what the logs gain until the stage ends")
    p.add_argument("--tail", type=int, default=0, metavar="N", help="only the last N lines of each file")
    p.add_argument("--json", action="store_true", help="print the log files as one JSON object (no contents)")


def pick_stage(status: dict) -> str:
    from jobs.runs import ACTIVE, FAILED_STATES
    stages = status["stages"]
    failed = [n for n, s in stages.items() if s["state"] in FAILED_STATES - {"CANCELLED", "NOT_SUBMITTED"}]
    running = [n for n, s in stages.items() if s["state"] in ACTIVE - {"PENDING"}]
    ran = [n for n, s in stages.items() if s["state"] not in ("NOT_SUBMITTED", "PENDING", "CANCELLED")]
    return (failed or running or [ran[-1]] if (failed or running or ran) else list(stages))[0]


def log_files(run_dir: Path, run: dict, jobs: dict, pipeline, stage: str, task: int | None, rank: int = 0) -> list[dict]:
    """[{path, stream, job_id, attempt}] of one stage, earliest first; files that do not exist yet included
    (a pending job's), so --follow can wait for them."""
    if stage not in pipeline.stages:
        raise ConfigError(f"{run_dir}: no stage {stage!r} in this run (stages: {', '.join(pipeline.stages)})")
    st = pipeline.stages[stage]
    if st.variants:
        task = 0 if task is None else task
        if not 0 <= task < len(st.variants):
            raise ConfigError(f"--task {task}: stage {stage} has tasks 0..{len(st.variants) - 1}")
    elif task is not None:
        raise ConfigError(f"--task {task}: stage {stage} is not a job array (it has no variants)")
    rec = jobs.get("stages", {}).get(stage, {})
    executor = rec.get("executor") or jobs.get("executor") or run.get("executor")
    if executor == "local":
        name = f"{stage}.log" if task is None else f"{stage}.{task}.log"
        return [{"path": str(run_dir / "logs" / name), "stream": "stdout+stderr", "job_id": "local", "attempt": 1}]
    from submitit.core.utils import JobPaths
    folder = Path(run["workdir"]) / run["run_id"] / "submitit" / stage
    ids = [j for j in rec.get("previous_job_ids", []) + [rec.get("job_id")] if j]
    files = []
    for attempt, job_id in enumerate(ids, 1):
        jid = f"{job_id.split('_')[0]}_{task}" if task is not None else job_id
        paths = JobPaths(folder, job_id=jid, task_id=rank)
        files += [{"path": str(paths.stdout), "stream": "stdout", "job_id": jid, "attempt": attempt},
                  {"path": str(paths.stderr), "stream": "stderr", "job_id": jid, "attempt": attempt}]
    return files


def _read(path: str, tail: int) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except FileNotFoundError:
        return ""
    if tail:
        text = "\n".join(text.splitlines()[-tail:]) + ("\n" if text else "")
    return text


def run(args) -> int:
    import json
    from jobs import runs
    run_dir = runs.find_run(args.run)
    run, pipeline, jobs = runs.load_run(run_dir)
    status = runs.run_status(run_dir)
    stage = args.stage or pick_stage(status)
    files = log_files(run_dir, run, jobs, pipeline, stage, args.task, args.rank)
    state = status["stages"][stage]["state"]
    if args.json:
        print(json.dumps({"run_id": run["run_id"], "stage": stage, "state": state,
                          "files": [{**f, "exists": Path(f["path"]).exists()} for f in files], "exit_code": 0}))
        return 0
    if not files:
        print(f"stage {stage} ({state}): never submitted, no logs", file=sys.stderr)
        return 0
    attempts = max(f["attempt"] for f in files)
    offsets = {}
    for f in files:
        p = Path(f["path"])
        head = f"==> {stage} {f['stream']}" + (f" (job {f['job_id']}, attempt {f['attempt']} of {attempts})"
                                                if attempts > 1 or f["job_id"] != "local" else "") + f": {p} <=="
        text = _read(f["path"], args.tail)
        print(head if p.exists() else head.replace("<==", "(not written yet) <=="))
        sys.stdout.write(text)
        offsets[f["path"]] = p.stat().st_size if p.exists() else 0
    sys.stdout.flush()
    if args.follow:
        follow(run_dir, stage, files, offsets)
    return 0


def follow(run_dir: Path, stage: str, files: list[dict], offsets: dict, poll_s: float = 1.0) -> None:
    """Print what the (latest attempt's) files gain until the stage is in a final state."""
    from jobs import runs
    last = [f for f in files if f["attempt"] == max(x["attempt"] for x in files)]
    done_since = None
    while True:
        grew = False
        for f in last:
            p = Path(f["path"])
            if not p.exists() or p.stat().st_size <= offsets.get(f["path"], 0):
                continue
            with open(p, "rb") as fh:
                fh.seek(offsets.get(f["path"], 0))
                chunk = fh.read()
            offsets[f["path"]] = offsets.get(f["path"], 0) + len(chunk)
            sys.stdout.write(chunk.decode("utf-8", "replace"))
            grew = True
        sys.stdout.flush()
        st = runs.run_status(run_dir)["stages"][stage]["state"]
        if st in runs.TERMINAL or st == "NOT_SUBMITTED":
            done_since = done_since or time.time()
            if not grew and time.time() - done_since > 2 * poll_s:   # the file system may lag the state
                print(f"==> {stage}: {st} <==", flush=True)
                return
        time.sleep(poll_s)

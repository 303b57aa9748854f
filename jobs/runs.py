"""
Run folders and their bookkeeping: create, status, wait, cancel, resume.

A run folder is results/<run_id>/ (or $NANOCHAT_RESULTS_DIR/<run_id>/, or the spec's results_dir):
    resolved.yaml     the spec after --set overrides (what the stages read)
    run.json          run id, pipeline, git commit, work directory, executor, creation time
    jobs.json         per stage: job id (Slurm) or pids, their start times and state (local), log path,
                      error, earlier job ids; a local run's driver (pid, start time, host)
    markers/<stage>[.<task>].done   written by the stage entry on success (rank 0)
    rows/*.json       one result row per job (jobs/rows.py)
    logs/             local runs' stage logs (Slurm logs live in the submitit folder, see jobs.json)
Big artifacts go to <workdir>/<run_id>/<stage>/ (workdir = NANOCHAT_BASE_DIR, default ~/.cache/nanochat).
"""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import time
from pathlib import Path

import yaml

from jobs.spec import REPO_ROOT, Pipeline
from jobs.stages import load_run_pipeline, read_json
from jobs.rows import failed_row_error
from jobs.processes import kill_group, process_alive
from jobs.slurm import scancel, slurm_job_states
from jobs.submit import missing_tasks, stage_completed
from nanochat.errors import ConfigError
from nanochat.files import atomic_write_json, atomic_write_text, get_base_dir, git_commit

# LOST: no longer queued, no accounting record, no marker and no row (see run_status)
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL",
            "DEADLINE", "PREEMPTED", "SKIPPED", "LOST"}
ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED",
          "REQUEUE_HOLD", "REQUEUE_FED", "STAGE_OUT", "SIGNALING"}


def _home() -> Path:
    """The checkout this code runs from, or the working directory for an installed (non-editable)
    copy, whose REPO_ROOT is site-packages: results never go there."""
    return REPO_ROOT if (REPO_ROOT / "pyproject.toml").is_file() else Path.cwd()


def results_root(pipeline: Pipeline | None = None) -> Path:
    """Spec key results_dir, else $NANOCHAT_RESULTS_DIR, else <repo>/results (./results when installed)."""
    if pipeline is not None and pipeline.results_dir:
        p = Path(pipeline.results_dir)
        return p if p.is_absolute() else _home() / p
    env = os.environ.get("NANOCHAT_RESULTS_DIR")
    return Path(env) if env else _home() / "results"


def new_run_id(pipeline: Pipeline) -> str:
    return f"{pipeline.name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(2)}"


def checked_run_id(pipeline: Pipeline, run_id: str | None) -> str:
    """The run id a submission takes (a new one unless given); ConfigError for a bad or taken one."""
    run_id = run_id or new_run_id(pipeline)
    if not run_id.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise ConfigError(f"--run-id {run_id!r}: use letters, digits, '-', '_' and '.' only")
    run_dir = (results_root(pipeline) / run_id).resolve()
    if (run_dir / "run.json").exists():
        raise ConfigError(f"--run-id {run_id}: {run_dir} already exists (use `resume {run_id}`)")
    return run_id


def create_run(pipeline: Pipeline, run_id: str | None, executor: str, overrides: list[str]) -> tuple[dict, Path]:
    run_id = checked_run_id(pipeline, run_id)
    run_dir = (results_root(pipeline) / run_id).resolve()
    run = {
        "run_id": run_id,
        "pipeline": pipeline.name,
        "spec_path": pipeline.source,
        "overrides": list(overrides),
        "git_commit": git_commit(REPO_ROOT),
        "workdir": str(get_base_dir().resolve()),
        "results_dir": str(run_dir),
        "executor": executor,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "stages": list(pipeline.stages),
    }
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "resolved.yaml", yaml.safe_dump(pipeline.raw, sort_keys=False))
        atomic_write_json(run_dir / "run.json", run)
    except OSError:
        if created:     # a full disk: leave no half-made run folder behind
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    return run, run_dir


def find_run(ref: str) -> Path:
    """A run folder path, or a run id under the results root."""
    p = Path(ref)
    if (p / "run.json").exists():
        return p.resolve()
    q = results_root() / ref
    if (q / "run.json").exists():
        return q.resolve()
    raise ConfigError(f"{ref}: no such run (looked for {p}/run.json and {q}/run.json)")


def load_run(run_dir: Path) -> tuple[dict, Pipeline, dict]:
    run = read_json(run_dir / "run.json")
    if run is None:
        raise ConfigError(f"{run_dir}/run.json: missing or unreadable")
    return run, load_run_pipeline(run_dir), read_json(run_dir / "jobs.json", {"stages": {}})


def _aggregate(states: list[str]) -> str:
    if not states:
        return "UNKNOWN"
    if all(s == "COMPLETED" for s in states):
        return "COMPLETED"
    for s in ("RUNNING", "REQUEUED", "COMPLETING", "CONFIGURING"):
        if s in states:
            return "RUNNING" if s != "REQUEUED" else "REQUEUED"
    if "PENDING" in states:
        return "PENDING"
    for s in ("FAILED", "OUT_OF_MEMORY", "TIMEOUT", "NODE_FAIL", "CANCELLED"):
        if s in states:
            return s
    return states[0]


def driver_state(jobs: dict) -> tuple[str, dict | None]:
    """("alive" | "dead" | "unknown", the driver record) of a local run's driver process. The pid
    and its start time name the process: a pid alone may belong to someone else after a crash.
    From another host the answer is "unknown" (the records are trusted)."""
    driver = jobs.get("driver") or ({"pid": jobs["driver_pid"]} if jobs.get("driver_pid") else None)
    if not driver or not driver.get("pid"):
        return "unknown", None
    if driver.get("host") and driver["host"] != socket.gethostname():
        return "unknown", driver
    return ("alive" if process_alive(int(driver["pid"]), driver.get("start")) else "dead"), driver


def _live_pids(rec: dict) -> list[int]:
    starts = rec.get("pid_starts") or {}
    return [p for p in rec.get("pids", []) if process_alive(int(p), starts.get(str(p)))]


def _local_state(rec: dict, driver: str, driver_rec: dict | None) -> tuple[str, str | None]:
    """A local stage's state and, when it failed, why; the driver's record is the truth while it
    lives; once it is dead a stage it left PENDING never ran (CANCELLED) and one it left RUNNING
    failed with it, unless its process still runs (then `cancel` stops it)."""
    st = rec.get("state", "UNKNOWN")
    if st not in ("PENDING", "RUNNING"):
        return st, rec.get("error")
    if driver == "alive" or (driver == "unknown" and driver_rec is not None):
        return st, None
    if driver == "unknown":   # a run folder from before the driver was recorded: the pids alone
        return ("FAILED", "its process is gone") if st == "RUNNING" and not _live_pids(rec) else (st, None)
    who = f"the local driver (pid {driver_rec['pid']}) died"
    if st == "PENDING":
        return "CANCELLED", f"{who} before the stage started"
    if _live_pids(rec):
        return "RUNNING", None
    return "FAILED", f"{who} while the stage ran"


def run_status(run_dir: Path) -> dict:
    """Each stage's state, elapsed time, job id and log path."""
    run, pipeline, jobs = load_run(run_dir)
    executor = jobs.get("executor", run.get("executor"))
    recs = jobs.get("stages", {})
    sacct = {}
    driver, driver_rec = driver_state(jobs) if executor == "local" else ("unknown", None)
    if executor == "slurm":
        ids = []
        for rec in recs.values():
            ids += rec.get("task_job_ids") or [rec.get("job_id")]
        sacct = slurm_job_states(ids)
    stages = {}
    for name, stage in pipeline.stages.items():
        rec = recs.get(name, {})
        info = {"stage": name, "kind": stage.kind, "job_id": rec.get("job_id"), "log": rec.get("log"),
                "depends_on": stage.depends_on, "state": "NOT_SUBMITTED", "elapsed": None}
        if executor == "slurm" and rec.get("job_id"):
            ids = rec.get("task_job_ids") or [rec["job_id"]]
            found = [sacct[i] for i in ids if i in sacct]
            if not found and rec["job_id"] in sacct:  # a pending array shows as A_[0-7]
                found = [sacct[rec["job_id"]]]
            pend = [v for k, v in sacct.items() if k.startswith(rec["job_id"] + "_[")]
            states = [f["state"] for f in found + pend]
            info["state"] = _aggregate(states) if states else "UNKNOWN"
            info["elapsed"] = found[0].get("elapsed") if found else None
            info["start"] = found[0].get("start") if found else None
            info["end"] = found[-1].get("end") if found else None
            info["tasks"] = {i: sacct[i]["state"] for i in ids if i in sacct} if rec.get("task_job_ids") else None
        elif executor == "local" and rec:
            info["state"], info["error"] = _local_state(rec, driver, driver_rec)
            if rec.get("started_at"):
                info["elapsed"] = round((rec.get("ended_at") or time.time()) - rec["started_at"], 1)
            info["job_id"] = "local:" + ",".join(str(p) for p in rec.get("pids", [])) if rec.get("pids") else None
        if info["state"] == "UNKNOWN" and _failed_row(run_dir, name, rec.get("job_id")):
            info["state"] = "FAILED"  # accounting does not know the job, but its row says it failed
        elif info["state"] == "UNKNOWN" and "_squeue_ok" in sacct and not stage_completed(run_dir, pipeline, name):
            # Not queued any more and no accounting record (slurmdbd down): the job is over. Without
            # a marker or a row it never ran (a dependency failed) or died without a word.
            failed_deps = [d for d in stage.depends_on if stages.get(d, {}).get("state") in
                           ("FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "LOST")]
            info["state"] = "CANCELLED" if failed_deps else "LOST"
        if stage_completed(run_dir, pipeline, name):
            # the marker is the truth about success (a resumed run keeps earlier stages' outputs)
            info["state"] = "COMPLETED"
        if info["state"] in FAILED_STATES:
            # the console shows why a stage failed, not only where its log is
            ids = ([f"local:{p}" for p in rec.get("pids", [])] if executor == "local"
                   else rec.get("task_job_ids") or ([rec["job_id"]] if rec.get("job_id") else []))
            info["error"] = (failed_row_error(run_dir, name, ids) if ids else None) or info.get("error")
        else:
            info.pop("error", None)
        stages[name] = info
    states = [s["state"] for s in stages.values()]
    overall = ("COMPLETED" if all(s == "COMPLETED" for s in states)
               else "RUNNING" if any(s in ACTIVE or s == "UNKNOWN" for s in states)
               else "FAILED" if any(s not in ("COMPLETED", "CANCELLED", "SKIPPED") for s in states)
               else "CANCELLED")
    return {"run_id": run["run_id"], "run_dir": str(run_dir), "executor": executor, "state": overall,
            "stages": stages}


# a stage in one of these states did not do its work; `status` exits 1 when the run ended so
FAILED_STATES = {"FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE",
                 "PREEMPTED", "LOST", "NOT_SUBMITTED"}


def status_exit_code(status: dict) -> int:
    """0 while the run is COMPLETED or still RUNNING, 1 once it ended FAILED or CANCELLED."""
    return 1 if status["state"] in ("FAILED", "CANCELLED") else 0


def first_error(status: dict) -> str | None:
    """'stage: error' of the first stage that failed with a known error (the run's one-line why)."""
    for s in status["stages"].values():
        if s["state"] != "CANCELLED" and s.get("error"):
            return f"stage {s['stage']} {s['state']}: {s['error']}"
    for s in status["stages"].values():
        if s["state"] in FAILED_STATES:
            return f"stage {s['stage']} {s['state']}" + (f": {s['error']}" if s.get("error") else "")
    return None


def _failed_row(run_dir: Path, stage: str, job_id: str | None) -> bool:
    if not job_id:
        return False
    for p in (run_dir / "rows").glob(f"{stage}__*.json"):
        row = read_json(p, {})
        if str(row.get("job_id", "")).split("_")[0] == job_id and row.get("state") == "FAILED":
            return True
    return False


def format_status(status: dict) -> str:
    lines = [f"run {status['run_id']} ({status['executor']}): {status['state']}   {status['run_dir']}"]
    lines.append(f"  {'stage':<18} {'state':<14} {'elapsed':>10}  {'job id':<14} log")
    for s in status["stages"].values():
        lines.append(f"  {s['stage']:<18} {s['state']:<14} {str(s['elapsed'] or '-'):>10}  "
                     f"{str(s['job_id'] or '-'):<14} {s['log'] or '-'}")
    for s in status["stages"].values():
        if s.get("error"):
            lines.append(f"  {s['stage']} {s['state']}: {s['error']}")
    return "\n".join(lines)


def wait_for_run(run_dir: Path, poll_s: float = 5.0, progress=print, timeout_s: float | None = None,
                 on_status=None, clock=time.monotonic, sleep=time.sleep) -> dict:
    """Follow a Slurm run until every stage is finished (sacct), printing each change; on_status(status)
    after each poll (the live progress lines reuse it rather than ask Slurm again). clock() and
    sleep(s) time the polls, the no-accounting warning and timeout_s (tests pass a clock that sleep advances)."""
    seen: dict[str, str] = {}
    t0 = clock()
    warned = False
    while True:
        status = run_status(run_dir)
        if on_status is not None:
            on_status(status)
        for name, s in status["stages"].items():
            if seen.get(name) != s["state"]:
                seen[name] = s["state"]
                progress(f"[{clock() - t0:7.1f}s] {name}: {s['state']} (job {s['job_id']})"
                         + (f": {s['error']}" if s.get("error") else ""))
        unknown = [n for n, s in status["stages"].items() if s["state"] == "UNKNOWN"]
        if unknown and not warned and clock() - t0 > 60:
            warned = True  # without accounting (slurmdbd) a finished job is invisible: say so, do not hang quietly
            progress(f"warning: neither sacct nor squeue knows the job(s) of {', '.join(unknown)}; "
                     f"is Slurm accounting (slurmdbd) running? still waiting for markers or rows")
        if all(s["state"] in TERMINAL or s["state"] == "NOT_SUBMITTED" for s in status["stages"].values()):
            return status
        if timeout_s is not None and clock() - t0 > timeout_s:
            return status
        sleep(poll_s)


def cancel_run(run_dir: Path) -> list[str]:
    """scancel the run's Slurm jobs, or stop its local processes. Returns what was cancelled.
    A local run whose driver died is settled: its leftover stage processes are stopped and its
    unfinished stages recorded FAILED or CANCELLED (settle_local_run)."""
    run, pipeline, jobs = load_run(run_dir)
    executor = jobs.get("executor", run.get("executor"))
    done = []
    if executor == "slurm":
        ids = [rec["job_id"] for name, rec in jobs.get("stages", {}).items()
               if rec.get("job_id") and not stage_completed(run_dir, pipeline, name)]
        if ids:
            scancel(ids)
            done = ids
    else:
        atomic_write_text(run_dir / "cancel_requested", time.strftime("%Y-%m-%dT%H:%M:%SZ\n", time.gmtime()))
        if driver_state(jobs)[0] == "dead":
            return settle_local_run(run_dir)
        for name, rec in jobs.get("stages", {}).items():
            if rec.get("state") == "RUNNING":
                for pid in _live_pids(rec):
                    kill_group(pid, signal.SIGTERM)
                    done.append(f"local:{pid}")
    return done


def settle_local_run(run_dir: Path, grace_s: float = 10.0) -> list[str]:
    """`cancel` of a local run whose driver died (kill -9, a crash): nobody else will finish its
    records. Stop the stage processes it left (SIGTERM, then SIGKILL after grace_s) and record each
    unfinished stage as `status` shows it (FAILED if it was running, CANCELLED if it never started),
    CANCELLED for one whose process had to be stopped. Returns 'local:PID' for each process stopped
    and 'stage: STATE' for each stage recorded."""
    from jobs.submit import update_jobs
    run, pipeline, jobs = load_run(run_dir)
    if jobs.get("executor", run.get("executor")) != "local":
        return []
    driver, driver_rec = driver_state(jobs)
    if driver != "dead":
        return []
    recs = jobs.get("stages", {})
    orphans = {name: _live_pids(rec) for name, rec in recs.items() if rec.get("state") == "RUNNING"}
    for pids in orphans.values():
        for pid in pids:
            kill_group(pid, signal.SIGTERM)
    deadline = time.time() + grace_s
    while any(_live_pids(recs[n]) for n in orphans) and time.time() < deadline:
        time.sleep(0.1)
    for name in orphans:
        for pid in _live_pids(recs[name]):
            kill_group(pid, signal.SIGKILL)
    status = run_status(run_dir)
    settled = {}
    for name, rec in recs.items():
        if rec.get("state") not in ("PENDING", "RUNNING"):
            continue
        st = status["stages"][name]
        state, error = st["state"], st.get("error")
        if orphans.get(name):
            state, error = "CANCELLED", f"the local driver (pid {driver_rec['pid']}) had died; `cancel` stopped the stage"
        settled[name] = {"state": state, "error": error, "ended_at": time.time(),
                         "note": error or "the local driver died"}

    def update(data):
        for name, rec in settled.items():
            data["stages"].setdefault(name, {}).update(rec)
    if settled:
        update_jobs(run_dir, update)
    return ([f"local:{pid}" for pids in orphans.values() for pid in pids]
            + [f"{name}: {rec['state']}" for name, rec in settled.items()])


def resume_plan(run_dir: Path) -> tuple[dict, Pipeline, list[str], dict[str, list[int]]]:
    """What resume would run: every stage not completed (with its still-missing array tasks).
    Refuses while any of the run's jobs is still active. The stages of a local run whose driver died
    are not: run_status shows them FAILED or CANCELLED (unless a process the driver left still runs;
    then `cancel` stops it)."""
    run, pipeline, _ = load_run(run_dir)
    status = run_status(run_dir)
    active = [n for n, s in status["stages"].items() if s["state"] in ACTIVE]
    if active:
        raise ConfigError(f"{run_dir}: stage {active[0]} is still {status['stages'][active[0]]['state']}; "
                          f"wait for it or `cancel` the run first")
    todo = [n for n in pipeline.stages if not stage_completed(run_dir, pipeline, n)]
    tasks = {n: missing_tasks(run_dir, pipeline, n) for n in todo if pipeline.stages[n].variants}
    return run, pipeline, todo, tasks


def clear_cancel_flag(run_dir: Path) -> None:
    try:
        (run_dir / "cancel_requested").unlink()
    except FileNotFoundError:
        pass


def latest_run() -> Path | None:
    root = results_root()
    runs = [p for p in root.glob("*/run.json")] if root.exists() else []
    return max(runs, key=lambda p: p.stat().st_mtime).parent if runs else None

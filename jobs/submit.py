"""
Submission: every stage of a run to Slurm at once through submitit (dependencies afterok, so a
failed stage cancels its dependants), or the same stages as local processes in dependency order.

Slurm: one SlurmExecutor per stage; a stage with variants becomes a job array (map_array). The
command returns as soon as sbatch has accepted everything; the jobs run whether or not the user
stays logged in. If any sbatch call fails, what was already submitted for this run is cancelled,
so a half-submitted run never lingers.

Local: `python -m jobs stage-run RUN_DIR STAGE [--task I]` child processes (each in its own process
group, so cancel can stop the whole tree), at most max_parallel at once, in dependency order; a
failed stage marks its dependants CANCELLED, as Slurm's kill-on-invalid-dep does.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from jobs.processes import Terminated, kill_group, process_start_time, raise_terminated, this_process
from jobs.rows import failed_row_error
from jobs.slurm import scancel, slurm_available
from jobs.stages import StageEntry, marker_path, read_json
from nanochat.errors import ConfigError, one_line
from nanochat.files import atomic_write_json


def choose_executor(name: str) -> str:
    if name == "auto":
        return "slurm" if slurm_available() else "local"
    if name == "slurm" and not slurm_available():
        raise ConfigError("--executor slurm: no Slurm here (sbatch not on PATH or sinfo does not answer)")
    return name


def update_jobs(run_dir: Path, update) -> dict:
    """Read-modify-write jobs.json under a file lock (the local runner and cancel both write it)."""
    from nanochat.locking import file_lock
    path = Path(run_dir) / "jobs.json"
    with file_lock(str(path) + ".lock"):
        data = read_json(path, {"stages": {}})
        update(data)
        atomic_write_json(path, data)
    return data


# -----------------------------------------------------------------------------
# Slurm

def slurm_parameters(pipeline, stage, dependency_ids: list[str]) -> dict:
    import submitit  # noqa: F401  (imported here: keeps `python -m jobs --help` fast)
    r = stage.resources
    c = pipeline.cluster
    params = dict(
        job_name=f"{pipeline.name}.{stage.name}",
        nodes=r.nodes,
        ntasks_per_node=r.tasks_per_node,
        cpus_per_task=r.cpus_per_task,
        time=r.time_min,
        signal_delay_s=r.signal_delay_s,
        # Slurm 22.05+: srun no longer takes --cpus-per-task from the allocation, and submitit's srun line
        # passes none, so each task could get one core while torch starts cpus_per_task threads. The
        # product sets it, not the user's setup lines (jobs.stages.check_cpu_binding checks what arrived).
        setup=[f"export SRUN_CPUS_PER_TASK={r.cpus_per_task}", *c.setup],
        # a requeued job resumes from its checkpoint; arrays run all their tasks at once
        additional_parameters={"requeue": True},
    )
    if r.gpus_per_node:
        params["gpus_per_node"] = r.gpus_per_node
    if r.mem_gb:
        params["mem"] = f"{int(r.mem_gb)}GB" if r.mem_gb == int(r.mem_gb) else f"{int(r.mem_gb * 1024)}MB"
    for key in ("partition", "account", "qos", "constraint"):
        value = getattr(r, key, "") or getattr(c, key)   # a stage's partition/constraint wins over the cluster's
        if value:
            params[key] = value
    if dependency_ids:
        params["additional_parameters"].update({"dependency": "afterok:" + ":".join(dependency_ids),
                                                "kill-on-invalid-dep": "yes"})
    return params


def submit_slurm(run: dict, run_dir: Path, pipeline, todo: list[str], tasks: dict[str, list[int]] | None = None) -> dict:
    """Submit the stages in `todo` (dependency order). Dependencies on stages outside `todo` are
    dropped (they completed earlier: resume). Returns {stage: job record} and records jobs.json."""
    import submitit
    tasks = tasks or {}
    records: dict[str, dict] = {}
    submitted: list[str] = []
    try:
        for name in todo:
            stage = pipeline.stages[name]
            deps = [records[d]["job_id"].split("_")[0] for d in stage.depends_on if d in records]
            folder = Path(run["workdir"]) / run["run_id"] / "submitit" / name
            ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=stage.resources.max_requeues)
            ex.update_parameters(**slurm_parameters(pipeline, stage, deps))
            entry = StageEntry(str(run_dir), name)
            if stage.variants:
                idx = tasks.get(name) or list(range(len(stage.variants)))
                ex.update_parameters(array_parallelism=len(idx))
                jobs = ex.map_array(entry, idx)
                array_id = jobs[0].job_id.split("_")[0]
                submitted.append(array_id)
                records[name] = {"job_id": array_id, "tasks": idx,
                                 "task_job_ids": [j.job_id for j in jobs],
                                 "log": str(jobs[0].paths.stdout).replace(f"{jobs[0].job_id}", f"{array_id}_%a")}
            else:
                job = ex.submit(entry)
                submitted.append(job.job_id)
                records[name] = {"job_id": job.job_id, "log": str(job.paths.stdout)}
            records[name].update(executor="slurm", submitted_at=time.time(), depends_on_jobs=deps)
    except Exception as e:
        if submitted:
            scancel(submitted)
        raise RuntimeError(f"sbatch failed for stage {name!r}: {str(e).strip().splitlines()[-1] if str(e).strip() else e}"
                           f"; cancelled the {len(submitted)} job(s) already submitted") from e
    _record(run_dir, "slurm", records)
    return records


def _record(run_dir: Path, executor: str, records: dict, **top) -> None:
    def update(data):
        data["executor"] = executor
        data.update(top)
        stages = data.setdefault("stages", {})
        for name, rec in records.items():
            old = stages.get(name)
            if old and old.get("job_id"):
                rec["previous_job_ids"] = old.get("previous_job_ids", []) + [old["job_id"]]
            stages[name] = rec
    update_jobs(run_dir, update)


# -----------------------------------------------------------------------------
# Local

def _stage_command(run_dir: Path, name: str, task: int | None) -> list[str]:
    cmd = [sys.executable, "-m", "jobs", "stage-run", str(run_dir), name]
    return cmd + (["--task", str(task)] if task is not None else [])


def run_local(run: dict, run_dir: Path, pipeline, todo: list[str], max_parallel: int = 1,
              tasks: dict[str, list[int]] | None = None, progress=print) -> dict[str, str]:
    """Run the stages in `todo` here, in dependency order, at most max_parallel processes at once.
    Blocks until done. Returns {stage: final state}.

    This process (the driver) is recorded in jobs.json (pid, start time, host), and so is each stage
    process, so that `status`, `cancel` and `resume` can tell when it died. However it ends (Ctrl-C,
    SIGTERM, SIGHUP, an error such as a full disk) it stops its stage processes first; after a
    kill -9 they stop themselves (follow_driver)."""
    tasks = tasks or {}
    run_dir = Path(run_dir)
    log_dir = run_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, NANOCHAT_BASE_DIR=run["workdir"], PYTHONUNBUFFERED="1", NANOCHAT_DRIVER_PID=str(os.getpid()))
    # share the cores between the stages that may run at once (jobs.stages._limit_threads)
    env.setdefault("NANOCHAT_STAGE_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, max_parallel))))
    # the child must import this checkout's jobs/ and nanochat/ whatever the cwd
    repo = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    state: dict[str, str] = {n: "PENDING" for n in todo}
    pending_tasks = {n: list(tasks.get(n) or (range(len(pipeline.stages[n].variants)) if pipeline.stages[n].variants else [None]))
                     for n in todo}
    running: dict[tuple[str, int | None], tuple[subprocess.Popen, float, object]] = {}
    task_failed: dict[str, bool] = {n: False for n in todo}
    pids: dict[str, list[int]] = {n: [] for n in todo}
    logs: dict[tuple[str, int | None], Path] = {}
    failed_log: dict[str, tuple[Path, int]] = {}
    t_start = time.time()
    records = {n: {"executor": "local", "state": "PENDING",
                   "log": str(log_dir / (f"{n}.log" if pipeline.stages[n].variants == [] else f"{n}.<task>.log")),
                   "tasks": [t for t in pending_tasks[n] if t is not None] or None} for n in todo}

    def set_state(name, st, **extra):
        state[name] = st
        def update(data):
            rec = data["stages"].setdefault(name, {})
            rec.update(state=st, **extra)
        update_jobs(run_dir, update)
        progress(f"[{time.time() - t_start:7.1f}s] {name}: {st}" + (f" ({extra['note']})" if extra.get("note") else ""))

    cancelled = lambda: (run_dir / "cancel_requested").exists()
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {sig: signal.signal(sig, raise_terminated) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        _record(run_dir, "local", records, driver=this_process())   # one write: no stage without its driver
        while True:
            # reap finished processes
            for key, (proc, t0, fh) in list(running.items()):
                rc = proc.poll()
                if rc is None:
                    continue
                fh.close()
                del running[key]
                name, _ = key
                if rc != 0:
                    task_failed[name] = True
                    failed_log[name] = (logs[key], rc)
                if not pending_tasks[name] and not any(k[0] == name for k in running):
                    if task_failed[name]:
                        error = (failed_row_error(run_dir, name, [f"local:{p}" for p in pids[name]])
                                 or _why_it_ended(*failed_log[name]))
                        set_state(name, "CANCELLED" if cancelled() else "FAILED", ended_at=time.time(),
                                  error=error, note=f"exit {rc}" + (f": {error}" if error else "")
                                  + f"; log {records[name]['log']}")
                    else:
                        set_state(name, "COMPLETED", ended_at=time.time(), note=f"{time.time() - t0:.1f}s")
            # dependants of failed stages will never run
            for name in todo:
                if state[name] == "PENDING":
                    deps = [d for d in pipeline.stages[name].depends_on if d in state]
                    if cancelled() or any(state[d] in ("FAILED", "CANCELLED") for d in deps):
                        pending_tasks[name] = []
                        set_state(name, "CANCELLED", note="a dependency did not complete" if not cancelled() else "cancel requested")
            # start what is ready, within the cap
            for name in todo:
                if state[name] not in ("PENDING", "RUNNING") or not pending_tasks[name]:
                    continue
                deps = [d for d in pipeline.stages[name].depends_on if d in state]
                if not all(state[d] == "COMPLETED" for d in deps):
                    continue
                while pending_tasks[name] and len(running) < max_parallel:
                    task = pending_tasks[name].pop(0)
                    log_path = log_dir / (f"{name}.log" if task is None else f"{name}.{task}.log")
                    fh = open(log_path, "ab")
                    proc = subprocess.Popen(_stage_command(run_dir, name, task), stdout=fh, stderr=subprocess.STDOUT,
                                            env=env, start_new_session=True)
                    running[(name, task)] = (proc, time.time(), fh)
                    logs[(name, task)] = log_path
                    pids[name].append(proc.pid)
                    start = process_start_time(proc.pid)
                    if state[name] != "RUNNING":
                        set_state(name, "RUNNING", started_at=time.time(), pids=[proc.pid],
                                  pid_starts={str(proc.pid): start}, note=f"pid {proc.pid}, log {log_path}")
                    else:
                        def add(d, n=name, p=proc.pid, st=start):
                            d["stages"][n].setdefault("pids", []).append(p)
                            d["stages"][n].setdefault("pid_starts", {})[str(p)] = st
                        update_jobs(run_dir, add)
            if not running and all(s not in ("PENDING", "RUNNING") for s in state.values()):
                break
            time.sleep(0.2)
    except BaseException as e:
        # Ctrl-C, SIGTERM/SIGHUP, or this process failed (a full disk): no stage may outlive it
        for sig in handlers:
            signal.signal(sig, signal.SIG_IGN)   # a second SIGTERM must not cut the clean-up short
        _stop_all(running)
        stopped = isinstance(e, (KeyboardInterrupt, Terminated))
        why = "interrupted" if stopped else f"the driver failed: {one_line(e)}"
        try:
            for name in todo:
                if state[name] in ("PENDING", "RUNNING"):
                    set_state(name, "CANCELLED", ended_at=time.time(), note=why)
        except Exception:
            pass  # status works it out from the dead driver (jobs.runs.run_status)
        raise
    finally:
        for sig, old in handlers.items():
            signal.signal(sig, old)
    return state


def _stop_all(running: dict, grace_s: float = 10.0) -> None:
    """SIGTERM every stage's process group, give them grace_s to write their rows, then SIGKILL."""
    for proc, _, _ in running.values():
        kill_group(proc.pid)
    deadline = time.time() + grace_s
    for proc, _, fh in running.values():
        try:
            proc.wait(timeout=max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            pass
        kill_group(proc.pid, signal.SIGKILL)    # and whatever the stage left in its group
        try:
            proc.wait(timeout=5)
            fh.close()
        except (subprocess.TimeoutExpired, OSError):
            pass


def _why_it_ended(log: Path, rc: int) -> str | None:
    """A failed stage's one-line error when it left no row: the signal that killed it, else the last
    line of its log (a stage that could not write its row ends its log with its error)."""
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            lines = [ln for ln in f.read().decode("utf-8", "replace").splitlines() if ln.strip()]
    except (OSError, TypeError):
        return None
    return lines[-1].strip()[:500] if lines else None


def stage_completed(run_dir: Path, pipeline, name: str) -> bool:
    stage = pipeline.stages[name]
    if stage.variants:
        return all(marker_path(run_dir, name, i).exists() for i in range(len(stage.variants)))
    return marker_path(run_dir, name).exists()


def missing_tasks(run_dir: Path, pipeline, name: str) -> list[int]:
    stage = pipeline.stages[name]
    return [i for i in range(len(stage.variants)) if not marker_path(run_dir, name, i).exists()]

"""
Slurm's view of a run joined to its rows: sacct's state, elapsed time and exit code per job, the
GPU-hours and cost derived from them, and a line for each job that ended badly without a row of its
own (killed outright: scancel, kill -9, the time limit, a node failure).
"""
from __future__ import annotations

import json

import pandas as pd

from jobs.report.rows import ALL_COLUMNS
from jobs.rows import RESULT_COLUMNS
from jobs.slurm import SacctResult

# Slurm states of a job that ended without success (sacct's words); a job in any other state is
# still pending or running (or completed: then its missing row is only a problem, not a failure).
SACCT_ENDED_BADLY = ("FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE",
                     "PREEMPTED")
# The runner's own record (jobs.json) of a stage that ended without a row, where sacct has no word
RECORDED_ENDED_BADLY = ("FAILED", "CANCELLED", "TIMEOUT")


def rows_for_jobs_without_rows(run_id: str, stage: str, job_ids: list[str], recorded_state, sacct: SacctResult,
                               spec: dict, like: dict | None = None) -> list[dict]:
    """A job killed outright (scancel, kill -9, time limit, node failure) writes no row of its own.
    Its line in the report is built from what sacct says (or, without sacct, from the runner's own
    record): state as sacct has it (OUT_OF_MEMORY -> OOM, as rows name it), the error saying so, and
    extra.row_from naming where the line came from. Jobs still pending or running get none.
    like: the job's PREEMPTED row, when it was killed after a requeue (kind and variant from it)."""
    built = []
    for job_id in job_ids:
        job = sacct.jobs.get(job_id)
        if job is not None:
            if job.state not in SACCT_ENDED_BADLY or (like is not None and job.state == "PREEMPTED"):
                continue
            state, source = ("OOM" if job.state == "OUT_OF_MEMORY" else job.state), "sacct"
            what = "no result row after its requeue" if like is not None else "no result row"
            error = (f"the job wrote {what}; sacct: {job.state}, exit code {job.exit_code}, "
                     f"signal {job.signal}, elapsed {job.elapsed_s} s")
        elif like is not None:
            continue
        elif recorded_state in RECORDED_ENDED_BADLY:
            state, source = recorded_state, "jobs.json"
            error = f"the job wrote no result row; the runner recorded it {recorded_state}"
        else:
            continue
        _, _, task = job_id.partition("_")
        task = int(task) if task.isdigit() else None
        variants = spec.get("variants") or []
        row = {col: None for col in RESULT_COLUMNS}
        row.update(run_id=run_id, stage=stage, kind=spec.get("kind"), job_id=job_id, array_task=task,
                   variant=variants[task] if task is not None and task < len(variants) else None,
                   state=state, error=error, extra=json.dumps({"row_from": source}))
        if like is not None:
            row.update(kind=like.get("kind"), variant=like.get("variant"), array_task=like.get("array_task"),
                       requeues=like.get("requeues"))
        row["row_file"] = None
        row["row_problem"] = f"no row file: built from {source}"
        built.append(row)
    return built


def join_sacct(df: pd.DataFrame, sacct: SacctResult, price_per_gpu_hour: float) -> pd.DataFrame:
    """Fill the sacct_* columns and the derived gpus / gpu_hours / cost."""
    df = df.copy()
    for col, attr in (("sacct_state", "state"), ("sacct_elapsed_s", "elapsed_s"),
                      ("sacct_exit_code", "exit_code"), ("sacct_signal", "signal")):
        values = [getattr(sacct.jobs[j], attr) if isinstance(j, str) and j in sacct.jobs else None
                  for j in df["job_id"].astype(object).where(df["job_id"].notna(), None)]
        df[col] = pd.array(values, dtype=ALL_COLUMNS[col][0])
    device = df["device_name"].astype(object).where(df["device_name"].notna(), None)
    world = df["world_size"].astype(object).where(df["world_size"].notna(), None)
    gpus = []
    for name, ws in zip(device, world):
        if name is None:
            gpus.append(None)
        elif name.strip().lower() in ("cpu", "mps", ""):
            gpus.append(0)
        else:
            gpus.append(int(ws) if ws is not None else 1)
    df["gpus"] = pd.array(gpus, dtype="Int64")
    seconds = df["wall_time_s"].fillna(df["sacct_elapsed_s"].astype("float64"))
    df["gpu_hours"] = (seconds * df["gpus"].astype("float64") / 3600.0).astype("float64")
    df["cost"] = (df["gpu_hours"] * price_per_gpu_hour).astype("float64")
    return df

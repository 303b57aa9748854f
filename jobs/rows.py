"""
Result rows: one JSON object per job (stage or array task), written atomically into
results/<run>/rows/, whatever the job's outcome. results/README.md documents each column;
the report (jobs/report/) reads them with pandas.
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

from nanochat.files import atomic_write_json

# Column -> (pandas dtype, meaning). The one place the schema is defined.
RESULT_COLUMNS: dict[str, tuple[str, str]] = {
    "run_id": ("string", "run identifier (folder name under results/)"),
    "stage": ("string", "stage name from the pipeline spec (or the bench/array name)"),
    "kind": ("string", "stage kind: probe, base_train, mid_train, sft, inference_bench, bench"),
    "variant": ("string", "which side of a comparison (e.g. baseline, auto, eager-dynamic, compile-pack, kv-eager)"),
    "job_id": ("string", "Slurm job id (with _task for arrays), or local:<pid>"),
    "array_task": ("Int64", "SLURM_ARRAY_TASK_ID, empty outside arrays"),
    "state": ("string", "COMPLETED, FAILED, PREEMPTED (requeued) or OOM; on a line the report built for a job that wrote no row, sacct's state (CANCELLED, TIMEOUT, ...)"),
    "error": ("string", "one-line error when state is not COMPLETED"),
    "node": ("string", "host name the job ran on"),
    "device_name": ("string", "GPU name, or cpu"),
    "world_size": ("Int64", "number of ranks"),
    "depth": ("Int64", "model depth (layers)"),
    "n_params": ("Int64", "model parameter count"),
    "seq_len": ("Int64", "sequence length (tokens per row)"),
    "device_batch_size": ("Int64", "rows per forward/backward on one device"),
    "batch_size_source": ("string", "where device_batch_size came from: probe, cache, config, fallback (OOM after probe/cache) or config+oom_fallback"),
    "total_batch_size": ("Int64", "tokens per optimizer step over all ranks"),
    "grad_accum_steps": ("Int64", "micro-steps per optimizer step"),
    "steps": ("Int64", "optimizer steps taken in this job"),
    "tokens_per_s": ("float64", "all positions processed per second, all ranks"),
    "real_tokens_per_s": ("float64", "non-padding tokens per second, all ranks"),
    "supervised_tokens_per_s": ("float64", "tokens carrying loss per second (SFT)"),
    "padding_fraction": ("float64", "share of positions that were padding"),
    "mfu": ("float64", "model FLOPs utilisation in percent, where the bf16 peak is known"),
    "peak_memory_bytes": ("Int64", "peak device memory (CUDA) or peak RSS (CPU)"),
    "gpu_util_mean": ("float64", "mean GPU utilisation of rank 0's GPU over the stage (NVML, sampled every 0.5 s), "
                                 "percent; empty on CPU or without NVML"),
    "compile": ("boolean", "torch.compile on"),
    "num_compiles": ("Int64", "dynamo graphs compiled (one per compiled region, gpt.CompiledGPT; more on recompiles)"),
    "final_loss": ("float64", "last training loss"),
    "val_bpb": ("float64", "validation bits per byte"),
    "data_epochs": ("float64", "passes over the pretraining data the stage's token budget makes (base_train)"),
    "wall_time_s": ("float64", "job wall time in seconds"),
    "requeues": ("Int64", "times the job was requeued (preemption or time limit)"),
    "git_commit": ("string", "commit of the code that ran"),
    "started_at": ("string", "UTC ISO time the job started"),
    "finished_at": ("string", "UTC ISO time the row was written"),
    "extra": ("string", "JSON object of kind-specific figures (e.g. inference ttft, bandwidth)"),
}


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def default_job_id() -> str:
    job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    task = os.environ.get("SLURM_ARRAY_TASK_ID")
    if job and task:
        return f"{job}_{task}"
    return job or f"local:{os.getpid()}"


def make_row(**fields) -> dict:
    """A row with every known column present (None where unknown) and the environment filled in.
    Unknown keys go into `extra` so nothing measured is dropped."""
    row = {k: None for k in RESULT_COLUMNS}
    row["job_id"] = default_job_id()
    task = os.environ.get("SLURM_ARRAY_TASK_ID")
    row["array_task"] = int(task) if task and task.isdigit() else None
    row["node"] = platform.node()
    row["finished_at"] = utc_now()
    extra = dict(fields.pop("extra", None) or {})
    for k, v in fields.items():
        if k in RESULT_COLUMNS:
            row[k] = v
        else:
            extra[k] = v
    row["extra"] = json.dumps(extra, sort_keys=True, default=str) if extra else None
    return row


def row_path(results_dir: str | Path, stage: str, job_id: str | None = None) -> Path:
    safe = (job_id or default_job_id()).replace(":", "-").replace("/", "-")
    return Path(results_dir) / "rows" / f"{stage}__{safe}.json"


def write_row(results_dir: str | Path, row: dict) -> Path:
    """Atomic (tmp + rename) so a reader never sees half a row, even with many array tasks at once."""
    path = row_path(results_dir, row["stage"], row.get("job_id"))
    atomic_write_json(path, row)
    return path


def failed_row_error(results_dir: str | Path, stage: str, job_ids: list[str] | None = None) -> str | None:
    """The one-line error of the stage's newest FAILED row (of these job ids, where given): what the
    console shows beside the log path when a stage fails."""
    wanted = {str(j) for j in job_ids} if job_ids else None
    best = None
    for p in Path(results_dir, "rows").glob(f"{stage}__*.json"):
        try:
            row = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(row, dict) or row.get("state") != "FAILED" or row.get("stage") != stage:
            continue
        job = str(row.get("job_id") or "")
        if wanted is not None and job not in wanted and job.split("_")[0] not in wanted:
            continue
        if best is None or str(row.get("finished_at") or "") >= str(best.get("finished_at") or ""):
            best = row
    return (best.get("error") or "failed (no error recorded)") if best else None

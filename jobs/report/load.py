"""
Loading one run folder for the report: which folder a RUN names, its run.json / jobs.json /
resolved.yaml, its rows (with lines built from sacct for jobs that left none), and the per-step
metrics CSVs of its training stages.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from jobs.report.rows import DEFAULT_PRICE_PER_GPU_HOUR, Problem, read_rows, rows_frame
from jobs.report.sacct import join_sacct, rows_for_jobs_without_rows
from jobs.slurm import SacctResult, query_sacct
from nanochat.errors import ConfigError

# Columns every metrics CSV has (written by the training loops, one line per optimizer step).
METRICS_COLUMNS = ["step", "loss", "lr", "tokens_per_s", "mfu", "peak_memory_bytes", "elapsed_s", "val_bpb"]


@dataclass
class RunData:
    run_id: str
    folder: Path
    info: dict                           # run.json, {} when absent
    rows: pd.DataFrame                   # ALL_COLUMNS, typed
    metrics: dict[str, pd.DataFrame]     # stage -> per-step metrics
    problems: list[Problem]
    sacct: SacctResult


# -----------------------------------------------------------------------------
# Finding runs

def _is_run_folder(p: Path) -> bool:
    return p.is_dir() and ((p / "rows").is_dir() or (p / "run.json").is_file())


def resolve_run(name: str | Path, results_dir: str | Path) -> Path:
    """RUN is a run id under results_dir, or a path to a run folder (one with run.json or rows/)."""
    results_dir = Path(results_dir)
    for candidate in (results_dir / str(name), Path(name)):
        if _is_run_folder(candidate):
            return candidate
    raise ConfigError(f"{name}: no such run (no run.json or rows/ in {results_dir / str(name)}, nor in {name})")


def latest_run(results_dir: str | Path) -> Path:
    """The run folder whose run.json (or rows/) changed last; reference and compare are not runs."""
    results_dir = Path(results_dir)
    runs = [p for p in results_dir.iterdir() if p.name not in ("reference", "compare") and _is_run_folder(p)] \
        if results_dir.is_dir() else []
    if not runs:
        raise ConfigError(f"{results_dir}: no runs found (--latest)")

    def changed(p: Path) -> float:
        marks = [p / "run.json", p / "rows"]
        return max(m.stat().st_mtime for m in marks if m.exists())
    return max(runs, key=changed)


def run_stages(info: dict, jobs: dict | None = None) -> dict[str, dict]:
    """{stage name: entry} from run.json's stages (a list of names, or {name: {...}}), each entry
    completed from jobs.json's record of that stage (job_id, task_job_ids, pids, state) and given
    its out_dir: <workdir>/<run_id>/<stage>, as the stage entry (jobs/stages.py) lays it out."""
    stages = info.get("stages") or {}
    if isinstance(stages, list):
        stages = {(s if isinstance(s, str) else s.get("name", str(i))): ({} if isinstance(s, str) else s)
                  for i, s in enumerate(stages) if isinstance(s, (str, dict))}
    records = ((jobs or {}).get("stages") or {}) if isinstance(jobs, dict) else {}
    out = {}
    for name, entry in stages.items():
        if not isinstance(entry, dict):
            continue
        entry = {**(records.get(name) if isinstance(records.get(name), dict) else {}), **entry}
        if not entry.get("out_dir") and info.get("workdir") and info.get("run_id"):
            entry["out_dir"] = str(Path(info["workdir"]) / str(info["run_id"]) / name)
        out[name] = entry
    return out


def _job_ids(entry: dict) -> list[str]:
    """The job ids a stage was given: array task ids (A_T) when it was an array, else its job id;
    local runs record process ids, which rows carry as local:<pid>."""
    ids = entry.get("task_job_ids") or entry.get("job_ids") or entry.get("job_id")
    if ids is None and entry.get("pids"):
        ids = [f"local:{p}" for p in entry["pids"]]
    if ids is None:
        return []
    return [str(j) for j in (ids if isinstance(ids, list) else [ids])]


def _resolved_stages(folder: Path) -> dict[str, dict]:
    """{stage: {"kind", "variants": [names]}} from the run's resolved.yaml; {} when unreadable."""
    try:
        raw = yaml.safe_load((folder / "resolved.yaml").read_text(encoding="utf-8"))
        stages = raw.get("stages") if isinstance(raw, dict) else None
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    out = {}
    for name, body in (stages.items() if isinstance(stages, dict) else []):
        if isinstance(body, dict):
            variants = body.get("variants") if isinstance(body.get("variants"), list) else []
            out[str(name)] = {"kind": body.get("kind") if isinstance(body.get("kind"), str) else None,
                              "variants": [v.get("name") if isinstance(v, dict) else None for v in variants]}
    return out


# -----------------------------------------------------------------------------
# Metrics CSVs

def find_metrics(folder: Path, stages: dict[str, dict]) -> dict[str, Path]:
    """stage -> metrics CSV: results/<run>/metrics/<stage>.csv first, then <out_dir>/metrics.csv
    (and <out_dir>/<variant>/metrics.csv for array stages), named <stage> or <stage>.<variant>
    as the stage entry names its copies."""
    found = {p.stem: p for p in sorted((folder / "metrics").glob("*.csv"))}
    for name, entry in stages.items():
        out_dir = Path(entry["out_dir"]) if entry.get("out_dir") else None
        copied = name in found or any(key.startswith(name + ".") for key in found)
        if copied or out_dir is None or not out_dir.is_dir():
            continue
        if (out_dir / "metrics.csv").is_file():
            found[name] = out_dir / "metrics.csv"
        for csv in sorted(out_dir.glob("*/metrics.csv")):
            found.setdefault(f"{name}.{csv.parent.name}", csv)
    return found


def read_metrics(path: Path, run_id: str, folder: Path) -> tuple[pd.DataFrame | None, list[Problem]]:
    rel = str(path.relative_to(folder)) if path.is_relative_to(folder) else str(path)
    try:
        # A job killed mid-write leaves a short last line: skip it rather than lose the file.
        df = pd.read_csv(path, on_bad_lines="skip")
    except (OSError, UnicodeDecodeError, ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        return None, [Problem(run_id, rel, "corrupt", f"unreadable metrics CSV ({type(e).__name__}: {e})".splitlines()[0])]
    problems = []
    if "lr" not in df.columns and "lrm" in df.columns:
        df = df.rename(columns={"lrm": "lr"})  # the training loop's name for the lr multiplier
    missing = [c for c in METRICS_COLUMNS if c not in df.columns]
    if "step" not in df.columns:
        return None, [Problem(run_id, rel, "corrupt", "metrics CSV has no step column")]
    if missing:
        problems.append(Problem(run_id, rel, "partial", "missing columns: " + ", ".join(missing)))
    for col in df.columns:
        df[col] = pd.to_numeric(df[col], errors="coerce")
    n = len(df)
    df = df.dropna(subset=["step"]).sort_values("step").reset_index(drop=True)
    if len(df) < n:
        problems.append(Problem(run_id, rel, "partial", f"{n - len(df)} line(s) without a readable step dropped"))
    return df, problems


# -----------------------------------------------------------------------------
# Loading one run

def load_run(folder: Path, price_per_gpu_hour: float = DEFAULT_PRICE_PER_GPU_HOUR,
             use_sacct: bool = True) -> RunData:
    folder = Path(folder)
    info, problems = {}, []
    if (folder / "run.json").is_file():
        try:
            info = json.loads((folder / "run.json").read_text(encoding="utf-8"))
            if not isinstance(info, dict):
                raise ValueError("not a JSON object")
        except (OSError, UnicodeDecodeError, ValueError) as e:
            problems.append(Problem(folder.name, "run.json", "corrupt", f"{e}".splitlines()[0]))
            info = {}
    run_id = str(info.get("run_id") or folder.name)
    rows, row_problems = read_rows(folder, run_id)
    problems += row_problems
    jobs = {}
    if (folder / "jobs.json").is_file():
        try:
            jobs = json.loads((folder / "jobs.json").read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            problems.append(Problem(run_id, "jobs.json", "corrupt", f"{e}".splitlines()[0]))

    # Stages of the run that left no row: the job died before writing one, or never ran.
    stages = run_stages(info, jobs)
    have_stage = {r["stage"] for r in rows}
    have_job = {r["job_id"] for r in rows}
    missing_jobs = {}
    for name, entry in stages.items():
        ids = _job_ids(entry)
        if name not in have_stage:
            missing_jobs[name] = (ids, entry.get("state"))
        elif entry.get("task_job_ids") and any(j not in have_job for j in ids):
            # an array: each task writes its own row
            missing_jobs[name] = ([j for j in ids if j not in have_job], entry.get("state"))

    job_ids = [r["job_id"] for r in rows if r["job_id"]] + [j for ids, _ in missing_jobs.values() for j in ids]
    sacct = query_sacct(job_ids) if use_sacct else SacctResult(False, "sacct not asked (--no-sacct)")
    specs = _resolved_stages(folder)
    for name, (ids, state) in missing_jobs.items():
        said = [f"job {j}: sacct {sacct.jobs[j].state} exit {sacct.jobs[j].exit_code}" for j in ids if j in sacct.jobs]
        if state and not said:
            said = [f"recorded state {state}"]
        detail = f"stage {name} (job {', '.join(ids) or 'never submitted'}) wrote no row" + \
            (f" ({'; '.join(said)})" if said else "")
        problems.append(Problem(run_id, f"rows/{name}__*.json", "missing", detail))
        rows += rows_for_jobs_without_rows(run_id, name, ids, state, sacct, specs.get(name, {}))
    # A job requeued after preemption keeps its id and its PREEMPTED row until the rerun overwrites it:
    # killed in between (or out of time again), that row is its last word, so sacct's end is added.
    for r in [r for r in rows if r["state"] == "PREEMPTED" and r["job_id"]]:
        if sum(1 for o in rows if o["job_id"] == r["job_id"]) == 1:
            rows += rows_for_jobs_without_rows(run_id, r["stage"], [r["job_id"]], None, sacct, {}, like=r)

    df = join_sacct(rows_frame(rows), sacct, price_per_gpu_hour)
    # Stages in the pipeline's order (run.json), then any others by name; array tasks in order.
    order = {name: i for i, name in enumerate(stages)}
    df["_order"] = [order.get(s, len(order)) if isinstance(s, str) else len(order) for s in df["stage"].astype(object)]
    df = df.sort_values(["_order", "stage", "array_task", "variant", "job_id"], na_position="first", kind="stable")
    df = df.drop(columns="_order").reset_index(drop=True)

    metrics = {}
    for stage, path in find_metrics(folder, stages).items():
        m, m_problems = read_metrics(path, run_id, folder)
        problems += m_problems
        if m is not None:
            metrics[stage] = m
    return RunData(run_id, folder, info, df, metrics, problems, sacct)

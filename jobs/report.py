"""
The report: turn one run (or several) into tables and plots a person can read at a glance.

    python -m jobs report RUN [RUN ...] [--baseline RUN] [--json] [--price-per-gpu-hour X]

Inputs, per run folder (results/<run>/):
- rows/*.json     one result row per job (jobs/rows.py). Missing, partial and corrupt files are
                  listed in the report, never fatal.
- run.json        written by the orchestration (stages: {name: {job_id, out_dir, kind, ...}});
                  optional. It tells which stages should have a row, and where their out_dir is.
- metrics/<stage>.csv  the per-step metrics of each training stage, copied there by the stage entry
                  (preferred: the results folder is then self-contained); for a stage without one,
                  <out_dir>/metrics.csv from run.json is read instead.
Slurm's own view (sacct: state, elapsed, exit code) is joined per job where Slurm ran it.

Outputs, into the run folder: report.csv (results/README.md documents every column), summary.md,
loss.png, throughput.png, batch_size.png. With several runs, each run folder gets its own report
and the comparison against the baseline run goes into results/compare/<baseline>_vs_<runs>/.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
import yaml
from matplotlib.figure import Figure  # the object API: no pyplot, no global figure state

from jobs.rows import RESULT_COLUMNS
from jobs.sacct import SacctResult, query_sacct
from nanochat.common import ConfigError, atomic_write_bytes, atomic_write_text

# A list price for renting one A100/H100-class GPU for an hour, in dollars; --price-per-gpu-hour
# sets the one that applies to you. It only scales the cost column; GPU-hours are measured.
DEFAULT_PRICE_PER_GPU_HOUR = 2.0

REPO_ROOT = Path(__file__).resolve().parents[1]


def default_results_dir() -> Path:
    """Where runs live, as the orchestration (jobs/runs.py) puts them: $NANOCHAT_RESULTS_DIR, else
    <repo>/results."""
    env = os.environ.get("NANOCHAT_RESULTS_DIR")
    return Path(env) if env else REPO_ROOT / "results"

# Columns the report adds to each result row. report.csv = RESULT_COLUMNS + REPORT_COLUMNS.
REPORT_COLUMNS: dict[str, tuple[str, str]] = {
    "row_file": ("string", "the row's JSON file, relative to the run folder"),
    "row_problem": ("string", "what was wrong with the row file (missing keys, unreadable values); empty when complete"),
    "sacct_state": ("string", "job state according to Slurm accounting (sacct), empty where Slurm did not run the job or sacct was unavailable"),
    "sacct_elapsed_s": ("Int64", "elapsed seconds according to sacct (ElapsedRaw)"),
    "sacct_exit_code": ("Int64", "exit status according to sacct (before the ':' of ExitCode)"),
    "sacct_signal": ("Int64", "signal that ended the job according to sacct (after the ':' of ExitCode), 0 if none"),
    "gpus": ("Int64", "GPUs the job held: world_size on a GPU, 0 on cpu/mps, empty when the device is unknown"),
    "gpu_hours": ("float64", "wall_time_s x gpus / 3600 (sacct_elapsed_s stands in when the row has no wall time)"),
    "cost": ("float64", "gpu_hours x the price per GPU-hour (--price-per-gpu-hour, default 2.0 $/GPU-h)"),
}
ALL_COLUMNS: dict[str, tuple[str, str]] = {**RESULT_COLUMNS, **REPORT_COLUMNS}

# Columns every metrics CSV has (written by the training loops, one line per optimizer step).
METRICS_COLUMNS = ["step", "loss", "lr", "tokens_per_s", "mfu", "peak_memory_bytes", "elapsed_s", "val_bpb"]

# The figures compared between runs, per (stage, variant).
FIGURE_METRICS = ["tokens_per_s", "real_tokens_per_s", "mfu", "device_batch_size", "final_loss", "val_bpb",
                  "wall_time_s", "gpu_hours"]

NOT_MEASURED = "not measured in this run"


@dataclass
class Problem:
    run_id: str
    path: str     # relative to the run folder where possible
    kind: str     # missing | corrupt | partial
    detail: str


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


# -----------------------------------------------------------------------------
# Reading rows: normalise each JSON object to the typed columns, noting what was wrong

def _normalise_value(value, dtype: str):
    """(value in the column's Python type, or None; True when the value could not be read)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None, False
    try:
        if dtype == "Int64":
            if isinstance(value, bool):
                return int(value), False
            f = float(value)
            return (int(round(f)), False) if math.isfinite(f) else (None, True)
        if dtype == "float64":
            if isinstance(value, bool):
                return float(value), False
            return float(value), False
        if dtype == "boolean":
            if isinstance(value, bool):
                return value, False
            text = str(value).strip().lower()
            if text in ("true", "1", "yes", "on"):
                return True, False
            if text in ("false", "0", "no", "off"):
                return False, False
            return None, True
        if isinstance(value, (dict, list)):
            return json.dumps(value, sort_keys=True, default=str), False
        return str(value), False
    except (TypeError, ValueError):
        return None, True


def normalise_row(raw: dict, run_id: str, row_file: str) -> tuple[dict, list[str]]:
    """One report line from one row object, and the list of what was wrong with it."""
    issues = []
    missing = [k for k in RESULT_COLUMNS if k not in raw]
    if missing:
        issues.append("missing keys: " + ", ".join(missing))
    row = {}
    for col, (dtype, _) in RESULT_COLUMNS.items():
        value, bad = _normalise_value(raw.get(col), dtype)
        if bad:
            issues.append(f"unreadable {col}={raw.get(col)!r}")
        row[col] = value
    # Keys the schema does not know stay visible: they are folded into `extra`.
    unknown = {k: v for k, v in raw.items() if k not in RESULT_COLUMNS}
    if unknown:
        extra = _extra(row)
        extra.update(unknown)
        row["extra"] = json.dumps(extra, sort_keys=True, default=str)
    if not row["run_id"]:
        row["run_id"] = run_id
    if not row["stage"]:
        # rows/<stage>__<job>.json: the file name still says which stage it was.
        row["stage"] = Path(row_file).name.split("__")[0].removesuffix(".json")
    row["row_file"] = row_file
    row["row_problem"] = "; ".join(issues) or None
    return row, issues


def _extra(row: dict) -> dict:
    try:
        extra = json.loads(row.get("extra") or "{}")
    except (TypeError, ValueError):
        return {}
    return extra if isinstance(extra, dict) else {}


def read_rows(folder: Path, run_id: str) -> tuple[list[dict], list[Problem]]:
    rows, problems = [], []
    rows_dir = folder / "rows"
    if not rows_dir.is_dir():
        return rows, [Problem(run_id, "rows/", "missing", "no rows/ folder: no job wrote a result row")]
    for path in sorted(rows_dir.glob("*.json")):
        rel = str(path.relative_to(folder))
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            detail = "empty file" if path.stat().st_size == 0 else f"not valid JSON ({e})"
            problems.append(Problem(run_id, rel, "corrupt", detail))
            continue
        if not isinstance(raw, dict):
            problems.append(Problem(run_id, rel, "corrupt", f"a JSON {type(raw).__name__}, not an object"))
            continue
        row, issues = normalise_row(raw, run_id, rel)
        if issues:
            problems.append(Problem(run_id, rel, "partial", "; ".join(issues)))
        rows.append(row)
    return rows, problems


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


# Slurm states of a job that ended without success (sacct's words); a job in any other state is
# still pending or running (or completed: then its missing row is only a problem, not a failure).
SACCT_ENDED_BADLY = ("FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE",
                     "PREEMPTED")
# The runner's own record (jobs.json) of a stage that ended without a row, where sacct has no word
RECORDED_ENDED_BADLY = ("FAILED", "CANCELLED", "TIMEOUT")


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


def rows_frame(rows: list[dict]) -> pd.DataFrame:
    """The typed table: one line per row, ALL_COLUMNS in order, dtypes from the schema."""
    df = pd.DataFrame({col: [r.get(col) for r in rows] for col in ALL_COLUMNS})
    return df.astype({col: dtype for col, (dtype, _) in ALL_COLUMNS.items()})


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


# -----------------------------------------------------------------------------
# The four optimizations: baseline and optimized figure from the same run, as a ratio

@dataclass
class Optimization:
    name: str               # which optimization
    metric: str             # which figure
    baseline_label: str
    optimized_label: str
    baseline: float | None = None
    optimized: float | None = None
    n_baseline: int = 0     # rows averaged on each side
    n_optimized: int = 0
    note: str = ""          # "not measured in this run" and why, when a side is missing
    not_applicable: str = ""  # why this device cannot measure it (a CUDA-only variant on a CPU, MFU without a peak)

    @property
    def ratio(self) -> float | None:
        if self.baseline is None or self.optimized is None or self.baseline == 0:
            return None
        return self.optimized / self.baseline

    def to_dict(self) -> dict:
        return {**asdict(self), "ratio": self.ratio}


# (optimization, row kind, metric, baseline side, optimized side); a side is (label, variant names,
# batch-size sources): a row belongs to it by its variant, or by where its batch size came from.
# The auto batch size pair goes by source because pipelines name the fixed-batch variant freely
# ("baseline", "fixed-32"): config = fixed, probe/cache/fallback = found automatically. A fixed
# batch that an out-of-memory fallback shrank ("config+oom_fallback") stays on the fixed side: the
# comparison is between what was asked for, not what the fallback made of it.
# Rows of kind "bench" (the bench commands) count as well: the variant names tell the pairs apart.
FIXED_BATCH = ("baseline", ("baseline",), ("config", "config+oom_fallback"))
AUTO_BATCH = ("auto", ("auto",), ("probe", "cache", "fallback"))
BATCH_SOURCES = FIXED_BATCH[2] + AUTO_BATCH[2]
OPTIMIZATION_PAIRS = [
    ("auto batch size", "base_train", "tokens_per_s", FIXED_BATCH, AUTO_BATCH),
    ("auto batch size", "base_train", "mfu", FIXED_BATCH, AUTO_BATCH),
    ("KV cache", "inference_bench", "tokens_per_s", ("naive", ("naive",), ()), ("kv-eager", ("kv-eager",), ())),
    ("KV cache", "inference_bench", "tokens_per_s", ("naive", ("naive",), ()), ("kv-static", ("kv-static",), ())),
    # kv-graph: the CUDA-graph-captured decode step, CUDA only (SKIPPED on CPU)
    ("KV cache", "inference_bench", "tokens_per_s", ("naive", ("naive",), ()), ("kv-graph", ("kv-graph",), ())),
    ("compile for SFT", "sft", "real_tokens_per_s", ("eager-dynamic", ("eager-dynamic",), ()),
     ("compile-pad", ("compile-pad",), ())),
    ("compile for SFT", "sft", "real_tokens_per_s", ("eager-dynamic", ("eager-dynamic",), ()),
     ("compile-pack", ("compile-pack",), ())),
    # what each part gives (issue 14): packing with compile held fixed, compile with packing held fixed;
    # eager-dynamic -> compile-pack above is everything against the original
    ("packing for SFT", "sft", "real_tokens_per_s", ("compile-pad", ("compile-pad",), ()),
     ("compile-pack", ("compile-pack",), ())),
    ("compile for packed SFT", "sft", "real_tokens_per_s", ("eager-pack", ("eager-pack",), ()),
     ("compile-pack", ("compile-pack",), ())),
]


def _completed(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["state"].fillna("") == "COMPLETED"]


def _side(df: pd.DataFrame, kind: str, side: tuple, metric: str) -> tuple[float | None, int, str]:
    """Mean of `metric` over the COMPLETED rows of this kind on this side; (value, n, why-not)."""
    variant, variants, sources = side
    by_variant = df["kind"].isin([kind, "bench"]).fillna(False) & df["variant"].isin(variants).fillna(False)
    # by source only within the stage kind itself: other benchmarks also run at a configured batch
    of_kind = (df["kind"] == kind).fillna(False)
    by_source = of_kind & df["batch_size_source"].isin(sources).fillna(False)
    if sources:  # a row whose source says fixed or found sits on that side only, whatever its variant is called
        by_variant &= ~(of_kind & df["batch_size_source"].isin(BATCH_SOURCES).fillna(False))
    rows = df[by_variant | by_source]
    if rows.empty:
        return None, 0, f"no {variant} row"
    done = _completed(rows)[metric].dropna()
    if done.empty:
        states = ", ".join(sorted(set(rows["state"].fillna("no state"))))
        reasons = {_extra({"extra": e}).get("skip_reason") for e in rows["extra"].astype(object)} - {None}
        return None, 0, f"no {metric} in {variant} rows ({states})" + \
            (f": {'; '.join(sorted(map(str, reasons)))}" if reasons else "")
    return float(done.mean()), int(len(done)), ""


def _first_token_rows(df: pd.DataFrame) -> list[tuple[str, str, dict]]:
    """(variant, job_id, extra) of the inference rows. Not only COMPLETED ones: the diversity figure
    is measured once per job and copied onto every variant row, a skipped variant's included."""
    rows = df[df["kind"].isin(["inference_bench", "bench"])]
    return [(v if isinstance(v, str) else "", j if isinstance(j, str) else "", _extra({"extra": e}))
            for v, j, e in zip(rows["variant"].astype(object), rows["job_id"].astype(object),
                               rows["extra"].astype(object))]


def first_token_comparison(df: pd.DataFrame) -> Optimization:
    """Multi-sample generation: how many distinct first tokens N samples got. The broadcast
    baseline (one first token sampled and copied to every sample) comes from rows of variant
    "broadcast", or from an extra field first_token_distinct_broadcast next to the measured one."""
    opt = Optimization("independent first token", "first_token_distinct", "broadcast", "independent")
    # One figure per job (and side): every variant row of a job carries the same measurement.
    independent, broadcast, samples = {}, {}, set()
    for variant, job, extra in _first_token_rows(df):
        value = extra.get("first_token_distinct")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            (broadcast if variant == "broadcast" else independent)[job] = float(value)
            n = extra.get("diversity_samples", extra.get("num_samples"))
            if isinstance(n, int) and variant != "broadcast":
                samples.add(n)
        value = extra.get("first_token_distinct_broadcast")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            broadcast[job] = float(value)
    if independent:
        opt.optimized, opt.n_optimized = sum(independent.values()) / len(independent), len(independent)
        if samples:
            opt.optimized_label = f"independent, of {'/'.join(map(str, sorted(samples)))} samples"
    if broadcast:
        opt.baseline, opt.n_baseline = sum(broadcast.values()) / len(broadcast), len(broadcast)
    if not independent:
        opt.note = f"{NOT_MEASURED}: no inference row with first_token_distinct"
    elif not broadcast:
        opt.note = f"{NOT_MEASURED}: no broadcast baseline (it gave 1 distinct first token by construction)"
    return opt


def _not_applicable(df: pd.DataFrame, kind: str, metric: str, *whys: str) -> str:
    """Why this device cannot give the figure at all, or "" when it could have (then the pair is
    "not measured in this run"): a side whose rows were SKIPPED (kv-graph needs CUDA), or MFU on a
    CPU, whose peak FLOPs are not known."""
    for why in whys:
        if "(SKIPPED)" in why:
            return why.split("(SKIPPED)", 1)[1].lstrip(": ") or "skipped on this device"
    devices = set(df.loc[(df["kind"] == kind).fillna(False), "device_name"].dropna())
    if metric == "mfu" and devices == {"cpu"}:
        return "MFU needs the device's peak FLOPs, which are not known for a CPU"
    return ""


def optimizations(df: pd.DataFrame) -> list[Optimization]:
    out = []
    for name, kind, metric, base, opt in OPTIMIZATION_PAIRS:
        o = Optimization(name, metric, base[0], opt[0])
        o.baseline, o.n_baseline, why_b = _side(df, kind, base, metric)
        o.optimized, o.n_optimized, why_o = _side(df, kind, opt, metric)
        if o.baseline is None or o.optimized is None:
            o.note = f"{NOT_MEASURED}: " + "; ".join(w for w in (why_b, why_o) if w)
            o.not_applicable = _not_applicable(df, kind, metric, why_b, why_o)
        out.append(o)
    out.append(first_token_comparison(df))
    return out


# -----------------------------------------------------------------------------
# Figures per (stage, variant), and the comparison of runs against a baseline run

def run_figures(df: pd.DataFrame) -> dict[tuple[str, str, str], float]:
    """(stage, variant, metric) -> mean over COMPLETED rows; plus ("(run)", "", ...) totals."""
    figures = {}
    done = _completed(df)
    for (stage, variant), group in done.groupby([done["stage"].fillna(""), done["variant"].fillna("")]):
        for metric in FIGURE_METRICS:
            values = group[metric].dropna()
            if not values.empty:
                figures[(stage, variant, metric)] = float(values.astype("float64").mean())
    figures.update(eval_figures(done))
    for metric in ("gpu_hours", "cost"):
        values = df[metric].dropna()
        if not values.empty:
            figures[("(run)", "", metric)] = float(values.sum())
    return figures


def compare_runs(runs: list[RunData], baseline: RunData) -> list[dict]:
    """One line per (run, stage, variant, metric) present in either the run or the baseline:
    both values and the ratio run / baseline (None where a side was not measured)."""
    base = run_figures(baseline.rows)
    lines = []
    for run in runs:
        if run is baseline:
            continue
        figs = run_figures(run.rows)
        for key in sorted(set(base) | set(figs)):
            b, v = base.get(key), figs.get(key)
            lines.append({"run_id": run.run_id, "baseline_run_id": baseline.run_id, "stage": key[0],
                          "variant": key[1], "metric": key[2], "baseline": b, "value": v,
                          "ratio": v / b if b not in (None, 0) and v is not None else None})
    return lines


# -----------------------------------------------------------------------------
# Plots (matplotlib's object API, PNG through Agg). Each builder returns the Figure so that
# callers (and tests) can look at its Axes before it is saved.

def loss_figure(curves: dict[str, pd.DataFrame]) -> Figure:
    """Training loss against step, one line per stage (label = stage, or run/stage); validation
    bits per byte on a second panel where the CSVs have eval steps."""
    fig = Figure(figsize=(9, 4.5))
    ax_loss, ax_val = fig.subplots(1, 2)
    for label, m in curves.items():
        if "loss" in m and m["loss"].notna().any():
            d = m.dropna(subset=["loss"])
            # markers: short runs log only a point or two, which a bare line would not show
            ax_loss.plot(d["step"], d["loss"], marker="." if len(d) <= 50 else None, label=label)
        if "val_bpb" in m and m["val_bpb"].notna().any():
            d = m.dropna(subset=["val_bpb"])
            ax_val.plot(d["step"], d["val_bpb"], marker="o", label=label)
    ax_loss.set(title="training loss", xlabel="step", ylabel="loss")
    ax_val.set(title="validation", xlabel="step", ylabel="bits per byte")
    for ax in (ax_loss, ax_val):
        if ax.lines:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    return fig


def throughput_figure(curves: dict[str, pd.DataFrame]) -> Figure:
    """Tokens per second against step, one line per stage (or run/stage)."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for label, m in curves.items():
        if "tokens_per_s" in m and m["tokens_per_s"].notna().any():
            d = m.dropna(subset=["tokens_per_s"])
            ax.plot(d["step"], d["tokens_per_s"], marker="." if len(d) <= 50 else None, label=label)
    ax.set(title="throughput", xlabel="step", ylabel="tokens/s (all ranks)")
    if ax.lines:
        ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def run_throughput_figure(runs: list[RunData]) -> Figure:
    """Bars: tokens/s of each stage/variant (mean of COMPLETED rows), one bar series per run."""
    per_run = {run.run_id: {(s, v): x for (s, v, m), x in run_figures(run.rows).items() if m == "tokens_per_s"}
               for run in runs}
    keys = sorted({k for figs in per_run.values() for k in figs})
    fig = Figure(figsize=(max(6, 1.2 * len(keys) + 2), 4.5))
    ax = fig.subplots()
    width = 0.8 / max(1, len(per_run))
    for i, (run_id, figs) in enumerate(per_run.items()):
        xs = [j + i * width for j in range(len(keys))]
        ax.bar(xs, [figs.get(k, 0.0) for k in keys], width=width, label=run_id)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))])
    ax.set_xticklabels([f"{s}\n{v}" if v else s for s, v in keys], fontsize="small")
    ax.set(title="throughput per run", ylabel="tokens/s (all ranks)")
    if keys:
        ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def batch_size_figure(df: pd.DataFrame) -> Figure:
    """Device batch size per stage: the one found (probe or cache) next to the default (config)."""
    rows = df.dropna(subset=["device_batch_size"])
    labels = []
    found, default = {}, {}
    for _, r in rows.iterrows():
        # One x position per stage: its variants differ in where the batch size came from.
        key = r["stage"]
        if key not in labels:
            labels.append(key)
        target = found if r["batch_size_source"] in ("probe", "cache") else default
        target.setdefault(key, int(r["device_batch_size"]))
    fig = Figure(figsize=(max(6, 1.0 * len(labels) + 2), 4.5))
    ax = fig.subplots()
    xs = range(len(labels))
    ax.bar([x - 0.2 for x in xs], [default.get(k, 0) for k in labels], width=0.4, label="default (config)")
    ax.bar([x + 0.2 for x in xs], [found.get(k, 0) for k in labels], width=0.4, label="found (probe/cache)")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, fontsize="small")
    ax.set(title="device batch size: found vs default", ylabel="rows per device step")
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def save_png(fig: Figure, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    atomic_write_bytes(path, buf.getvalue())
    return path


# -----------------------------------------------------------------------------
# summary.md

def _fmt(x, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)) or x is pd.NA:
        return ""
    if isinstance(x, float):
        if x != 0 and (abs(x) >= 1e5 or abs(x) < 1e-3):
            return f"{x:.3e}"
        return f"{x:.{digits}g}"
    return str(x)


def _ratio(x) -> str:
    return "" if x is None else f"{x:.2f}x"


def md_table(header: list[str], lines: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for line in lines:
        out.append("| " + " | ".join(_fmt(v).replace("|", "/").replace("\n", " ") for v in line) + " |")
    return "\n".join(out)


STAGE_TABLE_COLUMNS = ["variant", "job_id", "state", "sacct_state", "device_name", "world_size",
                       "device_batch_size", "batch_size_source", "grad_accum_steps", "steps", "tokens_per_s",
                       "real_tokens_per_s", "mfu", "peak_memory_bytes", "final_loss", "val_bpb", "wall_time_s",
                       "gpu_hours", "cost"]


def _cell(v):
    return None if v is pd.NA or (isinstance(v, float) and math.isnan(v)) else v


def optimizations_md(opts: list[Optimization]) -> str:
    """The pairs as a table; those this device cannot measure listed below it, with why."""
    lines = []
    for o in opts:
        if o.ratio is None and o.not_applicable:
            continue
        lines.append([o.name, o.metric, f"{o.baseline_label} (n={o.n_baseline})", o.baseline,
                      f"{o.optimized_label} (n={o.n_optimized})", o.optimized,
                      _ratio(o.ratio) if o.ratio is not None else o.note])
    out = md_table(["optimization", "figure", "baseline", "value", "optimized", "value", "ratio"], lines)
    skipped = [o for o in opts if o.ratio is None and o.not_applicable]
    if skipped:
        out += "\n\nNot measurable on this device:\n" + "\n".join(
            f"- {o.name}, {o.metric} ({o.baseline_label} vs {o.optimized_label}): {o.not_applicable}" for o in skipped)
    return out


CPU_RATIOS = ("These ratios were measured on a CPU, both sides in this run on the same cores. They show that each "
              "optimization works end to end and which way it moves this tiny model here. They do not predict "
              "the size of the effect on a GPU: there a larger batch fills thousands of cores, compilation fuses "
              "kernels and launches, and the KV cache saves memory-bound recomputation, each at costs a CPU does not "
              "have. GPU figures come only from a GPU run (results/reference/README.md).")


def run_summary_md(run: RunData, price: float, plots: list[str]) -> str:
    df = run.rows
    info = run.info
    parts = [f"# Run {run.run_id}", ""]
    for key in ("pipeline", "spec_path", "spec", "git_commit", "executor", "workdir", "created_at"):
        if info.get(key):
            parts.append(f"- {key}: {info[key]}")
    states = df["state"].fillna("(none)").value_counts().to_dict()
    parts.append(f"- rows: {len(df)} ({', '.join(f'{k} {v}' for k, v in states.items()) or 'none'})")
    parts.append("- sacct: " + ("joined" if run.sacct.available else f"not joined ({run.sacct.reason})"))
    gpu_h = df["gpu_hours"].dropna().sum()
    cost = df["cost"].dropna().sum()
    parts.append(f"- GPU-hours: {_fmt(float(gpu_h))} (wall_time_s x gpus / 3600; gpus = 0 on cpu); "
                 f"cost: ${float(cost):.2f} at ${price:g}/GPU-hour")
    parts += ["", "## Optimizations: baseline vs optimized, measured in this run", "",
              optimizations_md(optimizations(df)), ""]
    parts += report_card_md(df)
    if set(df["device_name"].dropna()) == {"cpu"}:
        parts += [CPU_RATIOS, ""]
    for stage, group in df.groupby(df["stage"].fillna("(no stage)"), sort=False):  # pipeline order
        kind = group["kind"].dropna()
        parts += [f"## Stage {stage}" + (f" ({kind.iloc[0]})" if not kind.empty else ""), ""]
        # Only the columns this stage measured: an inference stage has no loss, a failed job little.
        cols = [c for c in STAGE_TABLE_COLUMNS if c in ("job_id", "state") or group[c].notna().any()]
        parts.append(md_table(cols, [[_cell(r[c]) for c in cols] for _, r in group.iterrows()]))
        errors = group["error"].dropna()
        for job, err in zip(group.loc[errors.index, "job_id"], errors):
            parts.append(f"\n- error in {job}: {err}")
        parts.append("")
    parts += problems_md(run.problems)
    if plots:
        parts += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    return "\n".join(parts)


# -----------------------------------------------------------------------------
# The report card: evaluation stages (base_eval, chat_eval) keep their figures in `extra`

EVAL_KINDS = ("base_eval", "chat_eval")
EVAL_FIGURES = ["accuracy", "centered", "pass_at_1", "pass_at_k", "examples_per_s"]


def eval_table(df: pd.DataFrame) -> pd.DataFrame:
    """One line per evaluated task of the COMPLETED evaluation rows, its figures taken out of `extra`."""
    rows = df[df["kind"].isin(EVAL_KINDS) & (df["state"] == "COMPLETED")] if "kind" in df else df.iloc[:0]
    lines = []
    for _, r in rows.iterrows():
        extra = _extra(r)
        lines.append({"stage": r["stage"], "task": r["variant"], "k": extra.get("k"), "first_token": extra.get("first_token"),
                      "num_examples": extra.get("num_examples"), "eval_seconds": extra.get("eval_seconds"),
                      "chance": extra.get("chance", extra.get("random_baseline")),
                      **{m: extra.get(m) for m in EVAL_FIGURES}})
    # per stage: the tasks, then the combined metric (CORE, ChatCORE: the rows without an accuracy)
    lines.sort(key=lambda l: (str(l["stage"]), l["accuracy"] is None, str(l["task"])))
    return pd.DataFrame(lines)


def eval_figures(df: pd.DataFrame) -> dict[tuple[str, str, str], float]:
    """(stage, task, figure) -> value, for comparing runs (`jobs report RUN1 RUN2 --baseline RUN`)."""
    figures = {}
    for _, r in eval_table(df).iterrows():
        for m in EVAL_FIGURES:
            if r[m] is not None and not pd.isna(r[m]):
                figures[(str(r["stage"]).split(".")[0], str(r["task"]), m)] = float(r[m])
    return figures


def report_card_md(df: pd.DataFrame) -> list[str]:
    table = eval_table(df)
    if table.empty:
        return []
    cols = ["stage", "task", "accuracy", "chance", "centered", "pass_at_1", "pass_at_k", "k", "first_token",
            "num_examples", "eval_seconds", "examples_per_s"]
    parts = ["## Report card", "",
             "Accuracy per task; centered = (accuracy - chance) / (1 - chance); CORE and ChatCORE are the means "
             "of centered. pass@k rows: k samples per problem, with the engine's independent first token and, "
             "as `<task>.broadcast`, the old broadcast first token on the same model. A tiny (smoke) model's "
             "numbers are near chance: they show the path works, not that the model is good.", "",
             md_table(cols, [[_cell(r[c]) for c in cols] for _, r in table.iterrows()]), ""]
    return parts


def problems_md(problems: list[Problem]) -> list[str]:
    if not problems:
        return ["## Problems", "", "None: every row and metrics file was read.", ""]
    return ["## Problems (not fatal: the rest of the report stands)", "",
            md_table(["run", "file", "problem", "detail"], [[p.run_id, p.path, p.kind, p.detail] for p in problems]),
            ""]


def comparison_md(runs: list[RunData], baseline: RunData, lines: list[dict], plots: list[str]) -> str:
    parts = [f"# Comparison against baseline run {baseline.run_id}", "",
             "Runs: " + ", ".join(r.run_id for r in runs), "",
             "Figures are means over each (stage, variant)'s COMPLETED rows; ratio = run / baseline.", ""]
    parts += ["## Optimizations per run", ""]
    opt_lines = []
    for run in runs:
        for o in optimizations(run.rows):
            opt_lines.append([run.run_id, o.name, o.metric, f"{o.optimized_label} / {o.baseline_label}",
                              _ratio(o.ratio) if o.ratio is not None else o.note])
    parts += [md_table(["run", "optimization", "figure", "pair", "ratio"], opt_lines), ""]
    parts += ["## Figures against the baseline", ""]
    parts.append(md_table(["run", "stage", "variant", "figure", "baseline", "value", "ratio"],
                          [[l["run_id"], l["stage"], l["variant"], l["metric"], l["baseline"], l["value"],
                            _ratio(l["ratio"]) if l["ratio"] is not None else
                            "no ratio (baseline is 0)" if l["baseline"] == 0 and l["value"] is not None else NOT_MEASURED]
                           for l in lines]))
    parts.append("")
    parts += problems_md([p for r in runs for p in r.problems])
    if plots:
        parts += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    return "\n".join(parts)


# -----------------------------------------------------------------------------
# Writing

def write_report_csv(df: pd.DataFrame, path: Path) -> Path:
    atomic_write_text(path, df.to_csv(index=False))
    return path


def read_report_csv(path: str | Path) -> pd.DataFrame:
    """report.csv with the documented dtypes (the inverse of write_report_csv)."""
    dtypes = {col: dtype for col, (dtype, _) in ALL_COLUMNS.items()}
    return pd.read_csv(path, dtype=dtypes, keep_default_na=True)


def write_run_outputs(run: RunData, out_dir: Path, price: float) -> dict:
    """report.csv, plots and summary.md of one run into out_dir; returns {name: path}."""
    files = {"report_csv": write_report_csv(run.rows, out_dir / "report.csv")}
    plots = []
    if run.metrics:
        plots.append(save_png(loss_figure(run.metrics), out_dir / "loss.png"))
        plots.append(save_png(throughput_figure(run.metrics), out_dir / "throughput.png"))
    if run.rows["device_batch_size"].notna().any():
        plots.append(save_png(batch_size_figure(run.rows), out_dir / "batch_size.png"))
    summary = run_summary_md(run, price, [p.name for p in plots])
    files["summary_md"] = out_dir / "summary.md"
    atomic_write_text(files["summary_md"], summary)
    files.update({p.stem + "_png": p for p in plots})
    return files


def _compare_dir(results_dir: Path, baseline: RunData, runs: list[RunData]) -> Path:
    others = [r.run_id for r in runs if r is not baseline]
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{baseline.run_id}_vs_{'_'.join(others)}")[:150]
    return results_dir / "compare" / name


@dataclass
class Report:
    runs: list[RunData]
    files: dict[str, dict[str, Path]]        # run_id (or "compare") -> {name: path}
    baseline: str | None = None
    comparison: list[dict] = field(default_factory=list)
    price_per_gpu_hour: float = DEFAULT_PRICE_PER_GPU_HOUR

    @property
    def problems(self) -> list[Problem]:
        return [p for r in self.runs for p in r.problems]

    def to_json(self) -> dict:
        return {
            "runs": {r.run_id: {
                "folder": str(r.folder),
                "rows": int(len(r.rows)),
                "states": {str(k): int(v) for k, v in r.rows["state"].fillna("(none)").value_counts().items()},
                "sacct": r.sacct.reason or "joined",
                "gpu_hours": float(r.rows["gpu_hours"].dropna().sum()),
                "cost": float(r.rows["cost"].dropna().sum()),
                "optimizations": [o.to_dict() for o in optimizations(r.rows)],
            } for r in self.runs},
            "price_per_gpu_hour": self.price_per_gpu_hour,
            "baseline": self.baseline,
            "comparison": self.comparison,
            "problems": [asdict(p) for p in self.problems],
            "files": {k: {n: str(p) for n, p in v.items()} for k, v in self.files.items()},
        }


def build_report(runs: list[str | Path], results_dir: str | Path | None = None, baseline: str | Path | None = None,
                 price_per_gpu_hour: float = DEFAULT_PRICE_PER_GPU_HOUR, use_sacct: bool = True,
                 out_dir: str | Path | None = None) -> Report:
    """Read each run, write its report into its folder; with several runs (or a baseline), also
    compare each run against the baseline run (the first RUN when none is named) into out_dir
    (default results/compare/<baseline>_vs_<runs>/)."""
    results_dir = Path(results_dir) if results_dir else default_results_dir()
    if price_per_gpu_hour < 0 or not math.isfinite(price_per_gpu_hour):
        raise ConfigError(f"--price-per-gpu-hour: must be a finite number >= 0, got {price_per_gpu_hour}")
    folders = [resolve_run(r, results_dir) for r in runs]
    base_folder = resolve_run(baseline, results_dir) if baseline is not None else None
    if base_folder is not None and all(f.resolve() != base_folder.resolve() for f in folders):
        folders.insert(0, base_folder)
    if not folders:
        raise ConfigError("report: name at least one RUN (or --latest)")
    loaded = [load_run(f, price_per_gpu_hour, use_sacct) for f in folders]

    files = {}
    for run in loaded:
        files[run.run_id] = write_run_outputs(run, run.folder, price_per_gpu_hour)
    report = Report(loaded, files, price_per_gpu_hour=price_per_gpu_hour)
    if len(loaded) > 1:
        base = loaded[0] if base_folder is None else \
            next(r for r in loaded if r.folder.resolve() == base_folder.resolve())
        report.baseline = base.run_id
        report.comparison = compare_runs(loaded, base)
        cdir = Path(out_dir) if out_dir else _compare_dir(results_dir, base, loaded)
        combined = pd.concat([r.rows for r in loaded], ignore_index=True)
        cfiles = {"report_csv": write_report_csv(combined, cdir / "report.csv")}
        curves = {f"{r.run_id}/{stage}": m for r in loaded for stage, m in r.metrics.items()}
        plots = [save_png(run_throughput_figure(loaded), cdir / "throughput_by_run.png")]
        if curves:
            plots += [save_png(loss_figure(curves), cdir / "loss.png"),
                      save_png(throughput_figure(curves), cdir / "throughput.png")]
        cfiles["comparison_csv"] = cdir / "comparison.csv"
        atomic_write_text(cfiles["comparison_csv"], pd.DataFrame(
            report.comparison, columns=["run_id", "baseline_run_id", "stage", "variant", "metric", "baseline",
                                        "value", "ratio"]).to_csv(index=False))
        cfiles["summary_md"] = cdir / "summary.md"
        atomic_write_text(cfiles["summary_md"], comparison_md(loaded, base, report.comparison, [p.name for p in plots]))
        cfiles.update({p.stem + "_png": p for p in plots})
        files["compare"] = cfiles
    return report


# -----------------------------------------------------------------------------
# Command line: python -m jobs report

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="*", metavar="RUN", help="run id under --results-dir, or a path to a run folder")
    parser.add_argument("--latest", action="store_true", help="report the most recent run under --results-dir")
    parser.add_argument("--baseline", metavar="RUN", help="compare every RUN against this run (ratios)")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument("--price-per-gpu-hour", type=float, default=DEFAULT_PRICE_PER_GPU_HOUR, metavar="X",
                        help=f"dollars per GPU-hour for the cost column (default {DEFAULT_PRICE_PER_GPU_HOUR})")
    parser.add_argument("--results-dir", default=None, metavar="DIR",
                        help="where runs live (default $NANOCHAT_RESULTS_DIR, else <repo>/results)")
    parser.add_argument("--out", metavar="DIR", help="folder for the comparison of several runs "
                        "(default <results-dir>/compare/<baseline>_vs_<runs>)")
    parser.add_argument("--no-sacct", action="store_true", help="do not ask Slurm accounting")


def run(args: argparse.Namespace) -> int:
    runs = list(args.runs)
    if args.latest:
        runs.append(latest_run(args.results_dir or default_results_dir()))
    if not runs and not args.baseline:
        raise ConfigError("report: name a RUN, or pass --latest")
    report = build_report(runs, args.results_dir, baseline=args.baseline,
                          price_per_gpu_hour=args.price_per_gpu_hour, use_sacct=not args.no_sacct,
                          out_dir=args.out)
    for run_id, files in report.files.items():
        print(f"{run_id}: {files['summary_md']}")
    for p in report.problems:
        print(f"problem: {p.run_id} {p.path}: {p.kind}: {p.detail}")
    if args.json:
        print(json.dumps(report.to_json(), default=str))
    return 0


if __name__ == "__main__":
    import sys
    from jobs.command import run_module
    sys.exit(run_module(sys.modules[__name__], None, "python -m jobs.report"))

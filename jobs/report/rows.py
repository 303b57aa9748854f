"""
Result rows as the report reads them: each rows/*.json normalised to the typed columns of
report.csv (jobs/rows.py's RESULT_COLUMNS and the report's own), what was wrong with it noted as a
Problem, never fatal; report.csv written and read back with those types.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from jobs.rows import RESULT_COLUMNS
from nanochat.files import atomic_write_text

# A list price for renting one A100/H100-class GPU for an hour, in dollars; --price-per-gpu-hour
# sets the one that applies to you. It only scales the cost column; GPU-hours are measured.
DEFAULT_PRICE_PER_GPU_HOUR = 2.0

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


@dataclass
class Problem:
    run_id: str
    path: str     # relative to the run folder where possible
    kind: str     # missing | corrupt | partial
    detail: str



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
        extra = row_extra(row)
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


def row_extra(row: dict) -> dict:
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



def rows_frame(rows: list[dict]) -> pd.DataFrame:
    """The typed table: one line per row, ALL_COLUMNS in order, dtypes from the schema."""
    df = pd.DataFrame({col: [r.get(col) for r in rows] for col in ALL_COLUMNS})
    return df.astype({col: dtype for col, (dtype, _) in ALL_COLUMNS.items()})


def write_report_csv(df: pd.DataFrame, path: Path) -> Path:
    atomic_write_text(path, df.to_csv(index=False))
    return path


def read_report_csv(path: str | Path) -> pd.DataFrame:
    """report.csv with the documented dtypes (the inverse of write_report_csv)."""
    dtypes = {col: dtype for col, (dtype, _) in ALL_COLUMNS.items()}
    return pd.read_csv(path, dtype=dtypes, keep_default_na=True)

"""
The report: turn one run (or several) into tables and plots a person can read at a glance.

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

build_report writes the outputs (the command line is jobs/commands/report.py); the parts it puts
together: rows (row files -> typed columns, report.csv), sacct (Slurm's view joined per job), load
(one run folder read), pairs (optimization ratios, figures, comparison of runs), plots (PNGs) and
markdown (summary.md).
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from jobs.report.load import RunData, load_run, resolve_run
from jobs.report.markdown import comparison_md, run_summary_md
from jobs.report.pairs import compare_runs, optimizations
from jobs.report.plots import batch_size_figure, loss_figure, run_throughput_figure, save_png, throughput_figure
from jobs.report.rows import DEFAULT_PRICE_PER_GPU_HOUR, Problem, write_report_csv
from jobs.runs import results_root
from nanochat.errors import ConfigError
from nanochat.files import atomic_write_text


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
    results_dir = Path(results_dir) if results_dir else results_root()
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

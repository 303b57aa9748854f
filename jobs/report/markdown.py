"""
The report's Markdown: a run's summary.md (optimization ratios, report card, one table per stage,
problems, plots) and the comparison of runs against a baseline run.
"""
from __future__ import annotations

import math

import pandas as pd

from jobs.report.load import RunData
from jobs.report.pairs import NOT_MEASURED, Optimization, eval_table, optimizations
from jobs.report.rows import Problem

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


def report_card_md(df: pd.DataFrame) -> list[str]:
    table = eval_table(df)
    if table.empty:
        return []
    cols = ["stage", "task", "accuracy", "chance", "centered", "pass_at_1", "pass_at_k", "k", "first_token",
            "num_examples", "eval_seconds", "examples_per_s"]
    if table["isolation"].notna().any():   # which sandbox ran the model's code (HumanEval)
        cols.append("isolation")
    parts = ["## Report card", "",
             "Accuracy per task; centered = (accuracy - chance) / (1 - chance); CORE and ChatCORE are the means "
             "of centered. pass@k rows: k samples per problem, with the engine's independent first token and, "
             "as `<task>.broadcast`, the old broadcast first token on the same model. A tiny (smoke) model's "
             "numbers are near chance: they show the path works, not that the model is good. A task not run "
             "(HumanEval where no sandbox could be made) is absent here; its SKIPPED row and reason are in its "
             "stage's table.", "",
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

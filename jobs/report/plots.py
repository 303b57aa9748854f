"""
The report's plots: loss, throughput and batch size (matplotlib's object API, PNG through Agg:
no pyplot, no global figure state). Each builder returns the Figure so that callers (and tests)
can look at its Axes before it is saved.
"""
from __future__ import annotations

import io
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from jobs.report.load import RunData
from jobs.report.pairs import run_figures
from nanochat.files import atomic_write_bytes

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

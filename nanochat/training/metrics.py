"""
A training stage's metrics.csv (METRICS_COLUMNS, one row per logged step, rewritten atomically with
every row so far; a resumed run continues the same file) and MFU.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path

from nanochat.files import atomic_write_text
from nanochat.peaks import device_peaks

# num_steps: the steps this stage runs in all (SFT knows it only once its data is planned)
METRICS_COLUMNS = ["step", "loss", "lrm", "tokens_per_s", "mfu", "peak_memory_bytes", "elapsed_s", "val_bpb",
                   "num_steps"]


def write_metrics(path: Path, rows: list[dict]) -> None:
    """The stage's metrics.csv (METRICS_COLUMNS), rewritten atomically with every row so far."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=METRICS_COLUMNS)
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in METRICS_COLUMNS})
    atomic_write_text(path, buf.getvalue())


def read_metrics(path: Path, before_step: int) -> list[dict]:
    """Rows of an earlier attempt up to `before_step` (a resumed run continues the same file)."""
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [r for r in csv.DictReader(f) if r.get("step", "").isdigit() and int(r["step"]) <= before_step]


def mfu_percent(flops_per_token: float, tokens_per_s: float, device, world_size: int,
                peak_flops: float = 0.0) -> float | None:
    """Model FLOPs utilisation in percent against peaks.device_peaks (peak_flops: a user-given peak)."""
    peak = device_peaks(device, peak_flops)["peak_flops"]
    if not peak:
        return None
    return flops_per_token * tokens_per_s / (peak * world_size) * 100

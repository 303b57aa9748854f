"""Live progress (jobs/progress.py): stage lines read from the metrics files the training loop writes,
plain lines when stdout is not a terminal and `status --watch` on a real run: tests/test_smoke_run.py."""
import os
from pathlib import Path

import pytest

from jobs import progress, runs, spec
from nanochat.training.metrics import write_metrics

REPO = Path(__file__).resolve().parent.parent

TINY_TRAIN = {"kind": "base_train", "args": {
    "depth": 2, "vocab_size": 512, "seq_len": 64, "device_batch_size": 4, "total_batch_size": 512,
    "num_steps": 12, "eval_tokens": 2048, "log_every": 3, "eval_every": 0, "save_every": 0, "compile": "off"}}


def test_stage_lines_read_the_metrics_file_and_estimate_the_eta(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "work"))
    pipeline = spec.parse_pipeline({"name": "p", "stages": {"train": TINY_TRAIN, "after": {"kind": "noop", "depends_on": ["train"]}}}, "p.yaml")
    run, run_dir = runs.create_run(pipeline, "r", "local", [])
    out = Path(run["workdir"]) / "r" / "train"
    out.mkdir(parents=True)
    # what the training loop writes: 3 then 6 steps, 2 s apart
    write_metrics(out / "metrics.csv", [{"step": 3, "loss": 5.5, "tokens_per_s": 1000.0, "mfu": None, "elapsed_s": 4.0},
                                        {"step": 6, "loss": 4.25, "tokens_per_s": 1200.0, "mfu": 0.31, "elapsed_s": 6.0}])
    status = {"stages": {"train": {"state": "RUNNING", "elapsed": 9.5}, "after": {"state": "PENDING", "elapsed": None}}}
    lines = progress.stage_lines(run, pipeline, status)
    train, after = lines
    assert (train["step"], train["total"], train["loss"], train["tokens_per_s"]) == (6, 12, 4.25, 1200.0)
    assert train["elapsed_s"] == 9.5                  # the stage's wall time, not the loop's
    assert train["eta_s"] == pytest.approx(6 * 2.0 / 3)   # 6 steps left at 2/3 s a step
    assert after["step"] is None and after["state"] == "PENDING"
    status["stages"]["after"]["elapsed"] = "00:00:00"     # what sacct says of a job not started yet
    assert progress.stage_lines(run, pipeline, status)[1]["elapsed_s"] is None
    text = progress.plain_line(train)
    assert "step 6/12" in text and "loss 4.2500" in text and "tok/s 1,200" in text and "MFU 31.00%" in text and "ETA 4s" in text
    # the rich table renders the same fields
    from rich.console import Console
    console = Console(file=open(os.devnull, "w"), record=True, width=140)
    console.print(progress.table(lines, "run r"))
    text = console.export_text()
    assert "6/12" in text and "4.2500" in text


def test_a_stage_s_own_step_count_replaces_the_cap_from_its_arguments(tmp_path, monkeypatch):
    # SFT's max_steps is a cap: with 18 steps of data the stage runs 18, and its line must say so
    monkeypatch.setenv("NANOCHAT_RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "work"))
    pipeline = spec.parse_pipeline({"name": "p", "stages": {"sft": {"kind": "sft", "args": {"max_steps": 25}}}}, "p.yaml")
    run, _ = runs.create_run(pipeline, "r", "local", [])
    status = {"stages": {"sft": {"state": "RUNNING", "elapsed": 5.0}}}
    assert progress.stage_lines(run, pipeline, status)[0]["total"] == 25
    out = Path(run["workdir"]) / "r" / "sft"
    out.mkdir(parents=True)
    write_metrics(out / "metrics.csv", [{"step": 10, "loss": 1.0, "elapsed_s": 2.0, "num_steps": 18},
                                        {"step": 18, "loss": 0.9, "elapsed_s": 3.6, "num_steps": 18}])
    status["stages"]["sft"]["state"] = "COMPLETED"
    line = progress.stage_lines(run, pipeline, status)[0]
    assert (line["step"], line["total"]) == (18, 18)

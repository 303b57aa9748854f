"""The report: rows -> report.csv, summary.md, plots; missing/corrupt files; comparison of runs."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

from jobs import report as rp
from jobs.commands import report as report_command
from jobs.report import load as report_load, pairs as report_pairs, plots as report_plots, rows as report_rows
from jobs.report import sacct as report_sacct
from jobs.rows import make_row, row_path, write_row
from nanochat.errors import ConfigError
from nanochat.files import atomic_write_json
from jobs.slurm import SacctResult, is_slurm_job_id, parse_sacct, parse_sacct_table, query_sacct

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# -----------------------------------------------------------------------------
# Fixtures: realistic rows (jobs.rows.make_row/write_row) and metrics CSVs of a small CPU run

def common(run_id, stage, kind, variant, job_id, **kw):
    fields = dict(run_id=run_id, stage=stage, kind=kind, variant=variant, job_id=job_id, state="COMPLETED",
                  device_name="cpu", world_size=1, depth=2, n_params=1_054_720, seq_len=128,
                  git_commit="abc123", started_at="2026-11-24T20:00:00Z")
    fields.update(kw)
    return make_row(**fields)


def write_metrics(path: Path, steps: int, loss0: float, tps: float, eval_every: int = 5):
    lines = ["step,loss,lr,tokens_per_s,mfu,peak_memory_bytes,elapsed_s,val_bpb"]
    for s in range(steps):
        val = f"{2.5 - 0.05 * s:.4f}" if s % eval_every == 0 else ""
        lines.append(f"{s},{loss0 * 0.97 ** s:.4f},1.0,{tps + s:.1f},,{300_000_000 + s},{0.5 * (s + 1):.2f},{val}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def make_run(results: Path, run_id: str, speed: float = 1.0, gpu: bool = False) -> Path:
    """A run like the smoke pipeline plus the benchmark variants, with figures scaled by `speed`."""
    folder = results / run_id
    dev = dict(device_name="NVIDIA A100-SXM4-80GB", world_size=2) if gpu else {}
    rows = [
        common(run_id, "probe", "probe", None, "local:101", device_batch_size=16, batch_size_source="probe",
               wall_time_s=12.0, **dev),
        common(run_id, "base", "base_train", "baseline", "local:102", device_batch_size=4,
               batch_size_source="config", grad_accum_steps=4, total_batch_size=2048, steps=20,
               tokens_per_s=1000.0 * speed, real_tokens_per_s=1000.0 * speed, mfu=10.0 * speed,
               peak_memory_bytes=300_000_000, final_loss=6.1, val_bpb=2.3, wall_time_s=40.0, compile=False,
               num_compiles=0, **dev),
        common(run_id, "base_auto", "base_train", "auto", "local:103", device_batch_size=16,
               batch_size_source="probe", grad_accum_steps=1, total_batch_size=2048, steps=20,
               tokens_per_s=1500.0 * speed, real_tokens_per_s=1500.0 * speed, mfu=15.0 * speed,
               peak_memory_bytes=900_000_000, final_loss=6.0, val_bpb=2.25, wall_time_s=30.0, compile=False,
               num_compiles=0, **dev),
        common(run_id, "sft_bench", "sft", "eager-dynamic", "local:104", tokens_per_s=800.0 * speed,
               real_tokens_per_s=500.0 * speed, padding_fraction=0.375, compile=False, num_compiles=0,
               wall_time_s=20.0, **dev),
        common(run_id, "sft_bench", "sft", "compile-pad", "local:105", tokens_per_s=1200.0 * speed,
               real_tokens_per_s=750.0 * speed, padding_fraction=0.375, compile=True, num_compiles=1,
               wall_time_s=25.0, **dev),
        common(run_id, "sft_bench", "sft", "compile-pack", "local:106", tokens_per_s=1200.0 * speed,
               real_tokens_per_s=1150.0 * speed, padding_fraction=0.04, compile=True, num_compiles=1,
               wall_time_s=25.0, **dev),
    ]
    # The inference benchmark (nanochat.recipes.inference_bench): one job, one row per variant; the CUDA-graph
    # variant is skipped on CPU; the first-token diversity is measured once and copied onto each row.
    infer = dict(wall_time_s=2.0, first_token_distinct=6, diversity_samples=8, num_samples=1, ttft_s=0.02)
    rows += [
        common(run_id, "infer", "inference_bench", "naive", "local:107", tokens_per_s=50.0 * speed, **infer, **dev),
        common(run_id, "infer", "inference_bench", "kv-eager", "local:107", tokens_per_s=400.0 * speed, **infer, **dev),
        common(run_id, "infer", "inference_bench", "kv-static", "local:107", tokens_per_s=450.0 * speed, **infer, **dev),
        common(run_id, "infer", "inference_bench", "kv-graph", "local:107", **dict(infer, state="SKIPPED"),
               skip_reason="CUDA graph capture needs a CUDA device", **dev),
    ]
    for r in rows:
        if r["stage"] == "infer":  # as jobs/stages.py names one file per variant row
            atomic_write_json(row_path(folder, f"infer.{r['variant']}", r["job_id"]), r)
        else:
            write_row(folder, r)
    write_metrics(folder / "metrics" / "base.csv", 20, 7.0, 1000.0 * speed)
    write_metrics(folder / "metrics" / "base_auto.csv", 20, 7.0, 1500.0 * speed)
    # run.json and jobs.json as jobs/runs.py and jobs/submit.py write them for a local run.
    stages = list(dict.fromkeys(r["stage"] for r in rows))
    info = {"run_id": run_id, "pipeline": "smoke", "spec_path": "pipelines/smoke.yaml", "git_commit": "abc123",
            "workdir": str(results.parent / "work"), "executor": "local", "stages": stages}
    (folder / "run.json").write_text(json.dumps(info))
    jobs = {"executor": "local", "stages": {
        s: {"pids": [int(next(r["job_id"] for r in rows if r["stage"] == s).split(":")[1])], "state": "COMPLETED"}
        for s in stages}}
    (folder / "jobs.json").write_text(json.dumps(jobs))
    return folder


def report_args(*argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    report_command.add_arguments(parser)
    return parser.parse_args(list(argv))


# -----------------------------------------------------------------------------

def test_report_of_a_run_writes_csv_summary_and_plots(tmp_path, capsys):
    make_run(tmp_path, "r1")
    assert report_command.run(report_args("r1", "--results-dir", str(tmp_path), "--json", "--no-sacct")) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    folder = tmp_path / "r1"
    for name in ("report.csv", "summary.md", "loss.png", "throughput.png", "batch_size.png"):
        assert (folder / name).is_file(), name
    for png in folder.glob("*.png"):
        assert png.read_bytes()[:8] == PNG_MAGIC

    df = report_rows.read_report_csv(folder / "report.csv")
    assert len(df) == 10 and out["runs"]["r1"]["rows"] == 10
    assert out["problems"] == []
    # CPU: no GPUs held, so no GPU-hours and no cost.
    assert (df["gpus"] == 0).all() and (df["gpu_hours"] == 0).all() and (df["cost"] == 0).all()

    opts = {(o["name"], o["metric"], o["optimized_label"]): o for o in out["runs"]["r1"]["optimizations"]}
    assert opts[("auto batch size", "tokens_per_s", "auto")]["ratio"] == pytest.approx(1.5)
    assert opts[("auto batch size", "mfu", "auto")]["ratio"] == pytest.approx(1.5)
    assert opts[("KV cache", "tokens_per_s", "kv-eager")]["ratio"] == pytest.approx(8.0)
    assert opts[("compile for SFT", "real_tokens_per_s", "compile-pad")]["ratio"] == pytest.approx(1.5)
    assert opts[("compile for SFT", "real_tokens_per_s", "compile-pack")]["ratio"] == pytest.approx(2.3)
    assert opts[("KV cache", "tokens_per_s", "kv-static")]["ratio"] == pytest.approx(9.0)
    # kv-graph is CUDA-only: a CPU run must say so rather than show a number.
    graph = opts[("KV cache", "tokens_per_s", "kv-graph")]
    assert graph["ratio"] is None and graph["note"].startswith(report_pairs.NOT_MEASURED)
    assert "no tokens_per_s in kv-graph rows (SKIPPED): CUDA graph capture needs a CUDA device" in graph["note"]
    # The first-token figure is measured once per job (not once per row), and no broadcast
    # baseline was measured: the figure is shown, the ratio is not invented.
    first = opts[("independent first token", "first_token_distinct", "independent, of 8 samples")]
    assert (first["optimized"], first["n_optimized"], first["baseline"], first["ratio"]) == (6.0, 1, None, None)
    assert first["note"].startswith(report_pairs.NOT_MEASURED + ": no broadcast baseline")

    summary = (folder / "summary.md").read_text()
    assert "## Stage base (base_train)" in summary and "## Stage sft_bench (sft)" in summary
    assert "1.50x" in summary and "8.00x" in summary and "2.30x" in summary
    # what this device cannot measure is listed apart, with why, not as a missing measurement
    assert "kv-graph (n=0)" not in summary
    assert ("Not measurable on this device:\n- KV cache, tokens_per_s (naive vs kv-graph): "
            "CUDA graph capture needs a CUDA device") in summary
    assert "These ratios were measured on a CPU" in summary
    assert "None: every row and metrics file was read." in summary


def test_report_csv_round_trips_with_documented_dtypes(tmp_path):
    make_run(tmp_path, "r1", gpu=True)
    rep = rp.build_report(["r1"], tmp_path, price_per_gpu_hour=3.0, use_sacct=False)
    written = rep.runs[0].rows
    back = report_rows.read_report_csv(tmp_path / "r1" / "report.csv")
    assert list(back.columns) == list(report_rows.ALL_COLUMNS)
    for col, (dtype, _) in report_rows.ALL_COLUMNS.items():
        assert str(back[col].dtype) == pd.api.types.pandas_dtype(dtype).name, col
    pd.testing.assert_frame_equal(back, written, check_exact=False, rtol=1e-12)
    # GPU-hours: wall_time_s x world_size / 3600 on a GPU, cost at the given price.
    base = back[back["stage"] == "base"].iloc[0]
    assert base["gpus"] == 2
    assert base["gpu_hours"] == pytest.approx(40.0 * 2 / 3600)
    assert base["cost"] == pytest.approx(40.0 * 2 / 3600 * 3.0)
    assert bool(back.loc[back["variant"] == "compile-pack", "compile"].iloc[0]) is True


def test_missing_partial_and_corrupt_files_are_listed_not_fatal(tmp_path, capsys):
    folder = make_run(tmp_path, "r2")
    rows = folder / "rows"
    (rows / "mid__local-201.json").write_text('{"run_id": "r2", "stage": "mid", "state": "COMPL')  # cut short
    (rows / "sft__local-202.json").write_text("")
    (rows / "odd__local-203.json").write_text("[1, 2, 3]")
    # A partial row: an older writer that knew only a few columns, one of them unreadable.
    (rows / "chat__local-204.json").write_text(json.dumps(
        {"run_id": "r2", "stage": "chat", "state": "FAILED", "error": "CUDA error: device-side assert",
         "tokens_per_s": "fast", "wall_time_s": 3.5, "temperature": 0.8}))
    # A stage the orchestration launched that never wrote a row, and one never started.
    info = json.loads((folder / "run.json").read_text())
    info["stages"] += ["tokenizer", "chat_eval"]
    (folder / "run.json").write_text(json.dumps(info))
    jobs = json.loads((folder / "jobs.json").read_text())
    jobs["stages"]["tokenizer"] = {"pids": [99], "state": "FAILED"}
    (folder / "jobs.json").write_text(json.dumps(jobs))
    # A metrics CSV whose writer was killed mid-line, and one that is not a CSV at all.
    with open(folder / "metrics" / "base.csv", "a") as f:
        f.write("20,3.1")
    (folder / "metrics" / "sft.csv").write_bytes(b"\xff\xfe\x00garbage")

    assert report_command.run(report_args("r2", "--results-dir", str(tmp_path), "--json", "--no-sacct")) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    problems = {(p["path"], p["kind"]) for p in out["problems"]}
    assert ("rows/mid__local-201.json", "corrupt") in problems
    assert ("rows/sft__local-202.json", "corrupt") in problems
    assert ("rows/odd__local-203.json", "corrupt") in problems
    assert ("rows/chat__local-204.json", "partial") in problems
    assert ("rows/tokenizer__*.json", "missing") in problems
    assert ("metrics/sft.csv", "corrupt") in problems
    partial = next(p for p in out["problems"] if p["path"] == "rows/chat__local-204.json")
    assert "unreadable tokens_per_s='fast'" in partial["detail"] and "missing keys:" in partial["detail"]

    # The rest still stands: 10 good rows + the partial one, their ratios, the plots; and the stage
    # that died without a row still has its line, from the runner's record (no sacct here).
    df = report_rows.read_report_csv(folder / "report.csv")
    assert len(df) == 12
    tok = df[df["stage"] == "tokenizer"].iloc[0]
    assert (tok["state"], tok["job_id"], json.loads(tok["extra"])) == ("FAILED", "local:99", {"row_from": "jobs.json"})
    assert tok["row_problem"] == "no row file: built from jobs.json" and "wrote no result row" in tok["error"]
    chat = df[df["stage"] == "chat"].iloc[0]
    assert chat["state"] == "FAILED" and pd.isna(chat["tokens_per_s"]) and chat["wall_time_s"] == 3.5
    assert json.loads(chat["extra"]) == {"temperature": 0.8}
    assert (folder / "loss.png").read_bytes()[:8] == PNG_MAGIC
    summary = (folder / "summary.md").read_text()
    assert "## Problems (not fatal" in summary
    assert "stage tokenizer (job local:99) wrote no row (recorded state FAILED)" in summary
    assert "stage chat_eval (job never submitted) wrote no row" in summary
    assert "error in None" not in summary and "CUDA error: device-side assert" in summary
    auto = next(o for o in out["runs"]["r2"]["optimizations"] if o["metric"] == "tokens_per_s" and o["optimized_label"] == "auto")
    assert auto["ratio"] == pytest.approx(1.5)


def test_broadcast_baseline_gives_a_first_token_ratio(tmp_path):
    rows = [make_row(run_id="b", stage="div", kind="inference_bench", variant=v, job_id="local:5", state="COMPLETED",
                     first_token_distinct=n, diversity_samples=8) for v, n in (("broadcast", 1), ("kv-eager", 7))]
    opt = report_pairs.first_token_comparison(report_rows.rows_frame(rows))
    assert (opt.baseline, opt.optimized, opt.ratio, opt.note) == (1.0, 7.0, 7.0, "")


def test_auto_batch_pair_goes_by_batch_size_source():
    """pipelines/benchmark.yaml names the fixed-batch variant "fixed-32": the source says which is which."""
    def row(variant, source, tps, job):
        return make_row(run_id="b", stage="base_train", kind="base_train", variant=variant, job_id=job,
                        state="COMPLETED", device_batch_size=32 if source == "config" else 96,
                        batch_size_source=source, tokens_per_s=tps, mfu=tps / 100)
    sft_bench = make_row(run_id="b", stage="bench_sft", kind="bench", variant="eager-dynamic", job_id="6",
                         state="COMPLETED", batch_size_source="config", tokens_per_s=50.0, mfu=1.0)
    df = report_rows.rows_frame([row("fixed-32", "config", 1000.0, "5_0"), row("auto", "cache", 1300.0, "5_1"), sft_bench])
    tps, mfu = [o for o in report_pairs.optimizations(df) if o.name == "auto batch size"]
    assert (tps.baseline, tps.optimized, tps.ratio) == (1000.0, 1300.0, pytest.approx(1.3))
    assert mfu.ratio == pytest.approx(1.3)
    # The smoke pipeline: one base_train with the probe's batch size and no fixed-batch run.
    only_auto = [o for o in report_pairs.optimizations(report_rows.rows_frame([row(None, "probe", 900.0, "local:1")]))
                 if o.name == "auto batch size"]
    assert [o.optimized for o in only_auto] == [900.0, 9.0]
    assert all(o.ratio is None and "no baseline row" in o.note for o in only_auto)


def test_failed_baseline_is_not_measured(tmp_path):
    folder = make_run(tmp_path, "r3")
    row = json.loads((folder / "rows" / "base__local-102.json").read_text())
    row.update(state="OOM", error="CUDA out of memory", tokens_per_s=None, mfu=None)
    (folder / "rows" / "base__local-102.json").write_text(json.dumps(row))
    run = report_load.load_run(folder, use_sacct=False)
    auto = [o for o in report_pairs.optimizations(run.rows) if o.name == "auto batch size"]
    assert all(o.ratio is None and report_pairs.NOT_MEASURED in o.note and "OOM" in o.note for o in auto)


def test_comparison_of_two_runs_against_a_baseline(tmp_path, capsys):
    make_run(tmp_path, "old", speed=1.0)
    make_run(tmp_path, "new", speed=1.25)
    code = report_command.run(report_args("new", "--baseline", "old", "--results-dir", str(tmp_path), "--json", "--no-sacct"))
    assert code == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["baseline"] == "old"
    lines = {(l["run_id"], l["stage"], l["variant"], l["metric"]): l for l in out["comparison"]}
    for key in [("new", "base", "baseline", "tokens_per_s"), ("new", "base_auto", "auto", "mfu"),
                ("new", "sft_bench", "compile-pack", "real_tokens_per_s"), ("new", "infer", "kv-eager", "tokens_per_s")]:
        assert lines[key]["ratio"] == pytest.approx(1.25), key
    assert lines[("new", "base", "baseline", "final_loss")]["ratio"] == pytest.approx(1.0)
    assert all(l["run_id"] == "new" and l["baseline_run_id"] == "old" for l in out["comparison"])
    # Each run keeps its own report; the comparison has its own folder.
    cmp_dir = tmp_path / "compare" / "old_vs_new"
    for name in ("summary.md", "report.csv", "comparison.csv", "throughput_by_run.png", "loss.png"):
        assert (cmp_dir / name).is_file(), name
    assert (tmp_path / "old" / "summary.md").is_file() and (tmp_path / "new" / "summary.md").is_file()
    combined = report_rows.read_report_csv(cmp_dir / "report.csv")
    assert sorted(combined["run_id"].unique()) == ["new", "old"]
    summary = (cmp_dir / "summary.md").read_text()
    assert "# Comparison against baseline run old" in summary
    assert "| new | base | baseline | tokens_per_s | 1000 | 1250 | 1.25x |" in summary


def test_a_figure_only_one_run_measured_is_not_a_ratio(tmp_path):
    make_run(tmp_path, "a")
    make_run(tmp_path, "b", speed=2.0)
    os.remove(tmp_path / "b" / "rows" / "infer.kv-eager__local-107.json")
    rep = rp.build_report(["a", "b"], tmp_path, use_sacct=False)
    assert rep.baseline == "a"  # the first RUN when no --baseline is named
    line = next(l for l in rep.comparison if (l["stage"], l["variant"], l["metric"]) == ("infer", "kv-eager", "tokens_per_s"))
    assert line["value"] is None and line["ratio"] is None and line["baseline"] == 400.0


def test_figures_carry_the_expected_series(tmp_path):
    folder = make_run(tmp_path, "r4")
    run = report_load.load_run(folder, use_sacct=False)
    assert set(run.metrics) == {"base", "base_auto"}
    fig = report_plots.loss_figure(run.metrics)
    loss_ax, val_ax = fig.axes
    assert [l.get_label() for l in loss_ax.get_lines()] == ["base", "base_auto"]
    assert [l.get_label() for l in val_ax.get_lines()] == ["base", "base_auto"]
    assert len(loss_ax.get_lines()[0].get_xdata()) == 20 and len(val_ax.get_lines()[0].get_xdata()) == 4

    ax = report_plots.throughput_figure(run.metrics).axes[0]
    assert list(ax.get_lines()[1].get_ydata()[:2]) == [1500.0, 1501.0]

    ax = report_plots.batch_size_figure(run.rows).axes[0]
    default, found = ax.containers
    assert (default.get_label(), found.get_label()) == ("default (config)", "found (probe/cache)")
    labels = [t.get_text() for t in ax.get_xticklabels()]
    heights = {lab: (d.get_height(), f.get_height()) for lab, d, f in zip(labels, default, found)}
    assert heights["base"] == (4, 0) and heights["base_auto"] == (0, 16) and heights["probe"] == (0, 16)

    path = report_plots.save_png(fig, tmp_path / "x.png")
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_metrics_found_through_run_json_out_dir(tmp_path):
    folder = make_run(tmp_path, "r5")
    # As the stage entry lays it out: <workdir>/<run_id>/<stage>[/<variant>]/metrics.csv
    out_dir = tmp_path.parent / "work" / "r5"
    (out_dir / "base").mkdir(parents=True)
    shutil.move(folder / "metrics" / "base.csv", out_dir / "base" / "metrics.csv")
    write_metrics(out_dir / "sft_bench" / "compile-pack" / "metrics.csv", 6, 3.0, 1150.0)
    run = report_load.load_run(folder, use_sacct=False)
    assert set(run.metrics) == {"base", "base_auto", "sft_bench.compile-pack"}
    assert run.metrics["base"]["loss"].iloc[0] == 7.0 and len(run.metrics["sft_bench.compile-pack"]) == 6


def test_bad_input_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="nope: no such run"):
        rp.build_report(["nope"], tmp_path)
    (tmp_path / "not-a-run").mkdir()
    with pytest.raises(ConfigError, match="not-a-run: no such run"):
        rp.build_report([str(tmp_path / "not-a-run")], tmp_path)
    with pytest.raises(ConfigError, match="no runs found"):
        report_command.run(report_args("--latest", "--results-dir", str(tmp_path)))
    make_run(tmp_path, "r6")
    with pytest.raises(ConfigError, match="--price-per-gpu-hour"):
        rp.build_report(["r6"], tmp_path, price_per_gpu_hour=-1.0)


def test_latest_picks_the_newest_run(tmp_path, capsys):
    make_run(tmp_path, "older")
    past = 1_000_000_000          # 2001: older than anything made now, without reading the clock
    for p in [tmp_path / "older" / "run.json", tmp_path / "older" / "rows"]:
        os.utime(p, (past, past))
    make_run(tmp_path, "newer")
    assert report_command.run(report_args("--latest", "--results-dir", str(tmp_path), "--json", "--no-sacct")) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert list(out["runs"]) == ["newer"]


def test_sacct_state_is_joined_for_slurm_job_ids():
    text = ("4101|COMPLETED|65|0:0\n4101.batch|COMPLETED|65|0:0\n4102_3|CANCELLED by 0|7|0:15\n"
            "4103|OUT_OF_MEMORY|12|0:125\n")
    jobs = parse_sacct(text)
    assert set(jobs) == {"4101", "4102_3", "4103"}
    assert (jobs["4102_3"].state, jobs["4102_3"].elapsed_s, jobs["4102_3"].signal) == ("CANCELLED", 7, 15)
    assert is_slurm_job_id("4102_3") and is_slurm_job_id("4101") and not is_slurm_job_id("local:12")
    rows = [make_row(run_id="s", stage="base", state="COMPLETED", job_id="4101", device_name="NVIDIA H100 80GB HBM3",
                     world_size=8),
            make_row(run_id="s", stage="sweep", state=None, job_id="4102_3", device_name="cpu"),
            make_row(run_id="s", stage="sft", state="FAILED", job_id="4103", device_name=None)]
    df = report_sacct.join_sacct(report_rows.rows_frame(rows), SacctResult(True, "", jobs), price_per_gpu_hour=2.0)
    assert list(df["sacct_state"]) == ["COMPLETED", "CANCELLED", "OUT_OF_MEMORY"]
    assert list(df["sacct_exit_code"]) == [0, 0, 0] and list(df["sacct_signal"]) == [0, 15, 125]
    # No wall time in the row: sacct's elapsed time stands in for the GPU-hours.
    assert df["gpu_hours"].iloc[0] == pytest.approx(65 * 8 / 3600) and df["cost"].iloc[0] == pytest.approx(65 * 8 / 1800)
    assert df["gpus"].iloc[1] == 0 and pd.isna(df["gpus"].iloc[2])


def test_one_sacct_parser_serves_every_format():
    """jobs.slurm.parse_sacct_table reads any --format (status's, the rehearsal's): steps skipped, a pending
    array's A_[0-7] line kept, a short line ignored."""
    fields = ["JobID", "State", "NodeList", "NNodes", "Elapsed", "ExitCode"]
    text = "77|COMPLETED|n[1-2]|2|00:01:05|0:0\n77.batch|COMPLETED|n1|1|00:01:05|0:0\n78_[0-7]|PENDING|None|1|00:00:00|0:0\n79|RUNNING\n"
    table = parse_sacct_table(text, fields)
    assert table == {"77": {"State": "COMPLETED", "NodeList": "n[1-2]", "NNodes": "2", "Elapsed": "00:01:05", "ExitCode": "0:0"},
                     "78_[0-7]": {"State": "PENDING", "NodeList": "None", "NNodes": "1", "Elapsed": "00:00:00",
                                  "ExitCode": "0:0"}}


def test_sacct_missing_is_not_fatal(tmp_path, monkeypatch):
    # A PATH without sacct: the real lookup fails, and the answer says why.
    monkeypatch.setenv("PATH", str(tmp_path))
    res = query_sacct(["123", "124_1", "local:5"])
    assert not res.available and "not found" in res.reason
    assert not query_sacct(["local:5"]).available


def test_results_readme_documents_every_column():
    text = (REPO / "results" / "README.md").read_text()
    for col, (dtype, _) in report_rows.ALL_COLUMNS.items():
        assert f"| `{col}` | {dtype} |" in text, col


@pytest.mark.slurm
def test_sacct_on_the_local_slurm(tmp_path, local_slurm):
    out = subprocess.run(["sbatch", "--parsable", "--array=0-1", "-o", str(tmp_path / "%A_%a.out"),
                          "--wrap", 'sleep 1; test "$SLURM_ARRAY_TASK_ID" = 0'],
                         capture_output=True, text=True, timeout=60, check=True)
    job = out.stdout.strip().split(";")[0]
    ids = [f"{job}_0", f"{job}_1"]
    deadline = time.time() + 240
    while True:
        res = query_sacct(ids)
        assert res.available, res.reason
        states = {j: res.jobs[j].state for j in ids if j in res.jobs}
        if len(states) == 2 and all(s in ("COMPLETED", "FAILED") for s in states.values()):
            break
        assert time.time() < deadline, states
        time.sleep(3)
    assert states == {f"{job}_0": "COMPLETED", f"{job}_1": "FAILED"}
    assert res.jobs[f"{job}_1"].exit_code == 1 and res.jobs[f"{job}_0"].elapsed_s >= 1

    # The report joins sacct's view: task 0 wrote a row, task 1 died without one.
    folder = tmp_path / "slurm-run"
    write_row(folder, make_row(run_id="slurm-run", stage="grid", kind="noop", job_id=f"{job}_0", array_task=0,
                               state="COMPLETED", device_name="cpu", world_size=1))
    (folder / "run.json").write_text(json.dumps({"run_id": "slurm-run", "stages": ["grid"], "executor": "slurm"}))
    (folder / "jobs.json").write_text(json.dumps({"stages": {"grid": {"job_id": job, "task_job_ids": ids}}}))
    run = report_load.load_run(folder)
    assert run.sacct.available
    row = run.rows.iloc[0]
    assert (row["sacct_state"], row["sacct_exit_code"]) == ("COMPLETED", 0) and row["sacct_elapsed_s"] >= 1
    # No wall time in the row: sacct's elapsed stands in; cpu -> 0 GPUs -> 0 GPU-hours.
    assert row["gpu_hours"] == 0.0
    (missing,) = [p for p in run.problems if p.kind == "missing"]
    assert f"job {job}_1: sacct FAILED exit 1" in missing.detail


REAL_RUN = REPO / "tests" / "data" / "report" / "smoke-20261124-203923-1a0d"


def test_report_from_the_real_rows_of_a_smoke_run(tmp_path):
    """Rows, run.json, jobs.json and metrics CSVs kept from a real run of pipelines/smoke.yaml
    (local executor, CPU, all five stages). The expected figures are read from the row files."""
    folder = shutil.copytree(REAL_RUN, tmp_path / REAL_RUN.name)
    raw = {p.name: json.loads(p.read_text()) for p in (folder / "rows").glob("*.json")}
    tps = {r["variant"]: r["tokens_per_s"] for r in raw.values() if r["stage"] == "inference_bench"}

    rep = rp.build_report([REAL_RUN.name], tmp_path, use_sacct=False)
    (run,) = rep.runs
    assert run.problems == []
    df = report_rows.read_report_csv(folder / "report.csv")
    assert len(df) == len(raw) == 8
    assert list(dict.fromkeys(df["stage"])) == ["probe", "base_train", "mid_train", "sft", "inference_bench"]
    assert set(df["state"]) == {"COMPLETED", "SKIPPED"}  # kv-graph is skipped on CPU
    opts = {(o.name, o.optimized_label): o for o in report_pairs.optimizations(run.rows)}
    assert opts[("KV cache", "kv-eager")].ratio == pytest.approx(tps["kv-eager"] / tps["naive"])
    assert opts[("KV cache", "kv-static")].ratio == pytest.approx(tps["kv-static"] / tps["naive"])
    assert opts[("KV cache", "kv-graph")].ratio is None
    # The smoke pipeline runs one SFT mode and no fixed-batch base_train: no invented ratios.
    assert opts[("compile for SFT", "compile-pack")].ratio is None and opts[("compile for SFT", "compile-pack")].optimized
    assert all(o.ratio is None for o in report_pairs.optimizations(run.rows) if o.name == "auto batch size")
    first = next(o for o in report_pairs.optimizations(run.rows) if o.name == "independent first token")
    assert first.optimized == json.loads(raw["inference_bench.naive__local-25704.json"]["extra"])["first_token_distinct"]

    loss_ax, _ = report_plots.loss_figure(run.metrics).axes
    assert [l.get_label() for l in loss_ax.get_lines()] == ["base_train", "mid_train"]
    for name in ("loss.png", "throughput.png", "batch_size.png"):
        assert (folder / name).read_bytes()[:8] == PNG_MAGIC
    summary = (folder / "summary.md").read_text()
    assert summary.startswith(f"# Run {REAL_RUN.name}") and "## Stage inference_bench (inference_bench)" in summary


def test_array_task_rows_gather_into_one_table(tmp_path):
    """A Slurm array stage: one row per task (job ids A_T); a task that wrote no row is listed."""
    folder = tmp_path / "grid"
    for task, dbs in ((0, 8), (2, 32)):
        write_row(folder, make_row(run_id="grid", stage="sweep", kind="base_train", variant=f"dbs{dbs}",
                                   job_id=f"777_{task}", array_task=task, state="COMPLETED", device_name="cpu",
                                   world_size=1, device_batch_size=dbs, batch_size_source="config",
                                   tokens_per_s=100.0 * dbs, wall_time_s=10.0))
    (folder / "run.json").write_text(json.dumps({"run_id": "grid", "stages": ["sweep"], "executor": "slurm"}))
    (folder / "jobs.json").write_text(json.dumps({"executor": "slurm", "stages": {"sweep": {
        "job_id": "777", "tasks": [0, 1, 2], "task_job_ids": ["777_0", "777_1", "777_2"]}}}))
    run = report_load.load_run(folder, use_sacct=False)
    assert list(run.rows["job_id"]) == ["777_0", "777_2"] and list(run.rows["array_task"]) == [0, 2]
    assert [(p.kind, p.detail) for p in run.problems] == [("missing", "stage sweep (job 777_1) wrote no row")]
    figs = report_pairs.run_figures(run.rows)
    assert figs[("sweep", "dbs8", "tokens_per_s")] == 800.0 and figs[("sweep", "dbs32", "tokens_per_s")] == 3200.0


def test_a_fixed_batch_that_fell_back_after_oom_stays_on_the_fixed_side():
    """Issue 11 item 6: a configured batch shrunk by the OOM fallback is still the baseline, and a
    row's batch-size source decides its side even when its variant name says otherwise."""
    def row(variant, source, tps, job):
        return make_row(run_id="b", stage="base_train", kind="base_train", variant=variant, job_id=job,
                        state="COMPLETED", device_batch_size=16, batch_size_source=source, tokens_per_s=tps,
                        mfu=tps / 100)
    df = report_rows.rows_frame([row("fixed-32", "config", 1000.0, "5_0"),
                        row("fixed-64", "config+oom_fallback", 800.0, "5_1"),   # asked 64, fell back to 16
                        row("auto", "probe", 1300.0, "5_2"),
                        row("baseline", "cache", 1200.0, "5_3")])               # misnamed, but found by the cache
    tps = [o for o in report_pairs.optimizations(df) if o.name == "auto batch size" and o.metric == "tokens_per_s"][0]
    assert (tps.n_baseline, tps.baseline) == (2, 900.0)
    assert (tps.n_optimized, tps.optimized) == (2, 1250.0)


def test_a_job_killed_after_its_requeue_gets_sacct_s_end(tmp_path, monkeypatch):
    """A preempted job writes a PREEMPTED row and requeues under the same id; its rerun overwrites
    that row. Killed before the rerun writes one, the PREEMPTED row would be its last word: the
    report adds sacct's end. (sacct's answer is given here: a requeue cycle takes minutes on the
    local Slurm; tests/test_report_killed_jobs.py asks the real sacct about a real cancelled job.)"""
    from jobs.slurm import SacctJob, SacctResult
    folder = tmp_path / "rq"
    write_row(folder, make_row(run_id="rq", stage="train", kind="base_train", variant="auto", job_id="42",
                               state="PREEMPTED", requeues=0))
    write_row(folder, make_row(run_id="rq", stage="other", kind="noop", job_id="43", state="PREEMPTED"))
    (folder / "run.json").write_text(json.dumps({"run_id": "rq", "stages": ["train", "other"], "executor": "slurm"}))
    (folder / "jobs.json").write_text(json.dumps({"stages": {"train": {"job_id": "42"}, "other": {"job_id": "43"}}}))
    said = SacctResult(True, jobs={"42": SacctJob("42", "TIMEOUT", 600, 0, 15),
                                   "43": SacctJob("43", "RUNNING", 5, 0, 0)})     # 43: its rerun is on its way
    monkeypatch.setattr(report_load, "query_sacct", lambda ids: said)
    run = report_load.load_run(folder)
    assert list(zip(run.rows["job_id"], run.rows["state"])) == [("42", "PREEMPTED"), ("42", "TIMEOUT"), ("43", "PREEMPTED")]
    end = run.rows.iloc[1]
    assert (end["kind"], end["variant"], end["requeues"]) == ("base_train", "auto", 0)
    assert end["error"].startswith("the job wrote no result row after its requeue; sacct: TIMEOUT")

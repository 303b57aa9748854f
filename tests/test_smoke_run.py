"""Every test that only reads the shared smoke run (conftest.smoke_run: pipelines/smoke.yaml cut short,
run once per session as a user without Slurm runs it): the local executor end to end, the report
built from its real rows, and the plain progress lines of `submit` and `status --watch`. Kept in one
module so that `make test`'s workers (pytest-xdist, one module per worker at a time) make the run
once. Tests that break, kill or resume a run make their own (test_local_pipeline, test_driver_death)."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import rows
from jobs.report import load as report_load, rows as report_rows

REPO = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

pytestmark = pytest.mark.slow


def test_smoke_pipeline_runs_every_stage_locally_without_slurm(smoke_run):
    out = smoke_run.out                   # the embedded default, auto executor, no Slurm on PATH (conftest)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    last = json.loads(out.stdout.strip().splitlines()[-1])
    assert last["executor"] == "local" and last["state"] == "COMPLETED"
    assert set(last["stages"]) == {"probe", "base_train", "batch_baseline", "mid_train", "sft", "sft_baselines", "inference_bench", "base_eval", "chat_eval"}
    rs = rows(smoke_run.run_dir)
    # every stage completed; a benchmark variant may be SKIPPED where it cannot run (CUDA graphs on a CPU)
    assert {r["stage"] for r in rs if r["state"] == "COMPLETED"} == set(last["stages"])
    assert {r["state"] for r in rs} <= {"COMPLETED", "SKIPPED"}
    assert (smoke_run.run_dir / "report.csv").exists()
    # the probe served base_train: training read the very entry the probe wrote
    probe_row = next(r for r in rs if r["stage"] == "probe")
    train_row = next(r for r in rs if r["stage"] == "base_train")
    assert train_row["batch_size_source"] == "cache"
    assert train_row["device_batch_size"] == probe_row["device_batch_size"]


def test_report_of_a_real_smoke_run(tmp_path, smoke_run):
    """The smoke pipeline's real rows, end to end: `jobs report` on a copy of the shared smoke run's
    results (conftest.smoke_run; the copy, so the run's own files stay as it wrote them)."""
    assert smoke_run.out.returncode == 0, smoke_run.out.stderr[-3000:]
    results = tmp_path / "results"
    shutil.copytree(smoke_run.results, results)
    done = subprocess.run([sys.executable, "-m", "jobs", "report", "--latest", "--results-dir", str(results),
                           "--json"], cwd=REPO, env=smoke_run.env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    (run_id, info), = out["runs"].items()
    folder = Path(info["folder"])
    df = report_rows.read_report_csv(folder / "report.csv")
    assert len(df) >= 1 and info["rows"] == len(df)
    assert set(df["state"]) <= {"COMPLETED", "SKIPPED"}  # kv-graph is SKIPPED without CUDA
    assert df["wall_time_s"].notna().all() and (df["gpus"].fillna(0) == 0).all()
    recipe = ["probe", "base_train", "mid_train", "sft", "inference_bench"]
    assert [s for s in dict.fromkeys(df["stage"]) if s in recipe] == recipe
    assert set(df["stage"]) == set(recipe) | {"batch_baseline", "sft_baselines", "base_eval", "chat_eval"}
    assert out["problems"] == []
    kv = next(o for o in info["optimizations"] if o["optimized_label"] == "kv-eager")
    tps = df.set_index("variant")["tokens_per_s"]
    assert kv["ratio"] == pytest.approx(tps["kv-eager"] / tps["naive"])
    assert (folder / "summary.md").read_text().startswith(f"# Run {run_id}")
    assert report_load.find_metrics(folder, report_load.run_stages(json.loads((folder / "run.json").read_text()))).keys() >= {"base_train"}
    for name in ("loss.png", "throughput.png", "batch_size.png"):
        assert (folder / name).read_bytes()[:8] == PNG_MAGIC


def test_wait_prints_plain_progress_lines_when_not_a_terminal(smoke_run):
    # the shared smoke run (conftest.smoke_run): `submit --json`, stdout a pipe; base_train runs 4 steps
    out = smoke_run.out
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = [ln for ln in out.stdout.splitlines() if re.match(r"\s+base_train\s+(RUNNING|COMPLETED)\s+step", ln)]
    assert lines, out.stdout
    assert "\x1b[" not in out.stdout                 # no escape codes in a pipe
    assert re.search(r"COMPLETED\s+step 4/4\s+loss \d", lines[-1])
    assert json.loads(out.stdout.strip().splitlines()[-1])["state"] == "COMPLETED"
    # status shows the same lines; --watch on a finished run prints them and ends with the run's exit code
    st = subprocess.run([sys.executable, "-m", "jobs", "status", "smoke", "--watch", "--interval", "0.5", "--json"],
                        capture_output=True, text=True, env=smoke_run.env, cwd=REPO, timeout=120)
    assert st.returncode == 0 and "step 4/4" in st.stdout
    result = json.loads(st.stdout.strip().splitlines()[-1])
    train = next(p for p in result["progress"] if p["stage"] == "base_train")
    assert train["step"] == 4 and train["total"] == 4

"""Packaging: a non-editable install carries the built-in pipelines (installed as jobs/pipelines) and
writes results under the working directory, not into site-packages."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.rows import make_row, write_row

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_a_non_editable_install_finds_the_built_in_pipelines(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("jobs", "nanochat", "pipelines"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    site = tmp_path / "site"
    out = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                          "--target", str(site), str(src)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert {p.name for p in (site / "jobs" / "pipelines").glob("*.yaml")} >= {"smoke.yaml", "artemis-a100.yaml", "benchmark.yaml"}
    # every module and data file of the library and the orchestration (subpackages such as nanochat/tasks,
    # the evaluation fixtures the smoke pipeline reads) is in the installed copy
    for pkg in ("nanochat", "jobs"):
        files = [f.relative_to(REPO) for f in (REPO / pkg).rglob("*") if f.is_file() and "__pycache__" not in f.parts]
        missing = [str(f) for f in files if not (site / f).is_file()]
        assert not missing, f"not installed: {missing}"
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "NANOCHAT_RESULTS_DIR")}
    env.update(PYTHONPATH=str(site), NANOCHAT_BASE_DIR=str(tmp_path / "work"))
    for name in ("smoke", "artemis-a100"):
        out = subprocess.run([sys.executable, "-m", "jobs", "submit", name, "--dry-run", "--executor", "local"],
                             capture_output=True, text=True, env=env, cwd=cwd, timeout=300)
        assert out.returncode == 0, out.stderr
        assert f"({site / 'jobs' / 'pipelines' / name}.yaml)" in out.stdout
        assert f"results:  {cwd / 'results'}/{name}-" in out.stdout
    # the report looks where submit put the run: ./results, not <site-packages>/results
    run_dir = cwd / "results" / "r1"
    write_row(run_dir, make_row(run_id="r1", stage="a", kind="noop", state="COMPLETED", job_id="local:1"))
    out = subprocess.run([sys.executable, "-m", "jobs", "report", "--latest", "--no-sacct", "--json"],
                         capture_output=True, text=True, env=env, cwd=cwd, timeout=300)
    assert out.returncode == 0, out.stderr
    assert (run_dir / "summary.md").is_file() and not (site / "results").exists()

"""A Slurm job killed outright (scancel here; kill -9 and the time limit end the same way) writes no
result row of its own. The report must still have its line, built from sacct (jobs/report/).
Runs on the real local Slurm: a two-task array, one task finishes and writes its row, the other is
running (a 300 s sleep) when it is cancelled."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from jobs.report import rows as report_rows
from helpers import sacct, sacct_state, squeue_state, wait_until

REPO = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def test_a_cancelled_slurm_job_gets_a_report_row_from_sacct(tmp_path, local_slurm):
    env = dict(os.environ, NANOCHAT_RESULTS_DIR=str(tmp_path / "results"), NANOCHAT_BASE_DIR=str(tmp_path / "work"),
               PYTHONPATH=str(REPO))
    spec = tmp_path / "killed.yaml"
    spec.write_text(yaml.safe_dump({"name": "killed", "stages": {"sleepy": {
        "kind": "noop", "resources": {"time_min": 10},
        "variants": [{"name": "quick", "args": {"seconds": 0.0}}, {"name": "slow", "args": {"seconds": 300.0}}]}}}))
    out = subprocess.run([sys.executable, "-m", "jobs", "submit", str(spec), "--executor", "slurm", "--json",
                          "--run-id", "killed"], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout.strip().splitlines()[-1])
    run_dir, array = Path(info["run_dir"]), info["jobs"]["sleepy"]
    quick, slow = f"{array}_0", f"{array}_1"
    try:
        assert wait_until(lambda: list((run_dir / "rows").glob("sleepy__*_0.json")), 180), "task 0 wrote no row"
        assert wait_until(lambda: squeue_state(slow) == "RUNNING", 180), squeue_state(slow)
    finally:
        subprocess.run(["scancel", slow], check=True, timeout=30)
    assert wait_until(lambda: sacct_state(slow) == "CANCELLED", 120), sacct_state(slow)
    assert not list((run_dir / "rows").glob("sleepy__*_1.json"))      # killed: no row of its own

    out = subprocess.run([sys.executable, "-m", "jobs", "report", "killed", "--json"], capture_output=True,
                         text=True, env=env, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr
    df = report_rows.read_report_csv(run_dir / "report.csv")
    assert list(df["job_id"]) == [quick, slow]
    done, killed = df.iloc[0], df.iloc[1]
    assert (done["state"], done["variant"], done["sacct_state"]) == ("COMPLETED", "quick", "COMPLETED")
    assert (killed["stage"], killed["kind"], killed["variant"], killed["array_task"]) == ("sleepy", "noop", "slow", 1)
    assert killed["state"] == "CANCELLED" and killed["sacct_state"] == "CANCELLED"
    assert "wrote no result row; sacct: CANCELLED" in killed["error"]
    # the killed task's elapsed time is sacct's own (ElapsedRaw), the same figure sacct gives now
    assert json.loads(killed["extra"]) == {"row_from": "sacct"}
    assert killed["sacct_elapsed_s"] == int(sacct([slow], ("ElapsedRaw",))[slow]["elapsedraw"])
    summary = (run_dir / "summary.md").read_text()
    assert f"error in {slow}: the job wrote no result row; sacct: CANCELLED" in summary

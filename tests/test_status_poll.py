"""The status poll asks Slurm about this run's jobs only (`squeue --me -j IDS`), not the whole
cluster's queue. The real squeue answers; a shim in front of it on PATH records the arguments."""
import os
import stat
import subprocess
import time
from pathlib import Path

from jobs import runs


def _recording_squeue(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    real = subprocess.run(["which", "squeue"], capture_output=True, text=True).stdout.strip()
    shim = bin_dir / "squeue"
    shim.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/squeue.calls\nexec {real} "$@"\n')
    shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    return bin_dir


def test_status_poll_asks_squeue_for_the_runs_jobs_only(tmp_path, local_slurm, monkeypatch):
    monkeypatch.setenv("PATH", f"{_recording_squeue(tmp_path)}:{os.environ['PATH']}")
    job = subprocess.run(["sbatch", "--parsable", "-o", "/dev/null", "--wrap", "sleep 30"],
                         capture_output=True, text=True, timeout=60).stdout.strip().split(";")[0]
    try:
        states = runs.slurm_job_states([job])
        calls = (tmp_path / "squeue.calls").read_text().splitlines()
        assert calls == [f"--me -h -j {job} -o %i|%T|%M"]
        assert states[job]["state"] in ("PENDING", "RUNNING") and "_squeue_ok" in states
    finally:
        subprocess.run(["scancel", job], capture_output=True, timeout=60)
    # a job no longer queued (squeue -j exits 1, "Invalid job id") still counts as squeue's answer:
    # status can then tell a finished job from a lost one
    deadline = time.time() + 60
    while time.time() < deadline and subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout.strip():
        time.sleep(1)
    assert "_squeue_ok" in runs.slurm_job_states(["999999999"])

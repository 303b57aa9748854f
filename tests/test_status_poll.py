"""The status poll asks Slurm about this run's jobs only (`squeue --me -j IDS`), not the whole
cluster's queue. The real squeue answers; a shim in front of it on PATH records the arguments.
And `submit --wait`'s poll (jobs.runs.wait_for_run) on its injected clock: the no-accounting warning
and the timeout fall where their seconds say, without a second of real waiting."""
import os
import stat
import subprocess
import time
from pathlib import Path

from helpers import StepClock, path_without_slurm
from jobs import runs, slurm, spec, submit


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
        states = slurm.slurm_job_states([job])
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
    assert "_squeue_ok" in slurm.slurm_job_states(["999999999"])


def test_wait_warns_once_after_a_minute_of_unknown_jobs_and_stops_at_its_timeout(tmp_path, monkeypatch):
    # no sacct nor squeue on PATH: the run's job is UNKNOWN at every poll, as without accounting
    monkeypatch.setenv("PATH", path_without_slurm(tmp_path))
    monkeypatch.setenv("NANOCHAT_RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "work"))
    pipeline = spec.parse_pipeline({"name": "p", "stages": {"a": {"kind": "noop"}}}, "p.yaml")
    _, run_dir = runs.create_run(pipeline, "unknown", "slurm", [])
    submit._record(run_dir, "slurm", {"a": {"executor": "slurm", "job_id": "4242"}})
    clock, said, polls = StepClock(), [], []
    start = clock()
    status = runs.wait_for_run(run_dir, poll_s=5.0, progress=lambda m: said.append((clock() - start, m)),
                               timeout_s=300, on_status=lambda st: polls.append(clock() - start),
                               clock=clock, sleep=clock.advance)
    assert status["stages"]["a"]["state"] == "UNKNOWN"
    assert polls == [5.0 * i for i in range(62)]          # every 5 s, until past the 300 s timeout
    warnings = [(t, m) for t, m in said if m.startswith("warning:")]
    assert len(warnings) == 1 and warnings[0][0] == 65.0 and "slurmdbd" in warnings[0][1]   # the first poll past 60 s
    assert said[0] == (0.0, "[    0.0s] a: UNKNOWN (job 4242)")

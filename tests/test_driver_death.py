"""A local run whose driver (the `submit`/`resume` process) dies is never stuck (issue 12 item 1):
real drivers are killed with SIGKILL and SIGTERM while a real stage process runs; status, cancel and
resume then behave, and no stage process outlives its driver."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers import jobs_cli, last_json

REPO = Path(__file__).resolve().parent.parent

# `long` checkpoints every step, so a resumed run finishes it from where it stopped
PIPE = {"name": "driver", "stages": {
    "long": {"kind": "noop", "args": {"seconds": 12, "steps": 40, "checkpointable": True}},
    "after": {"kind": "noop", "depends_on": ["long"]}}}


@pytest.fixture
def env(tmp_path):
    spec = tmp_path / "p.yaml"
    spec.write_text(yaml.safe_dump(PIPE))
    e = dict(os.environ, NANOCHAT_RESULTS_DIR=str(tmp_path / "results"), NANOCHAT_BASE_DIR=str(tmp_path / "work"))
    return tmp_path, spec, e


def start_driver(tmp, spec, e, run_id):
    """A real local run; returns (driver process, the running stage's pid and start time)."""
    driver = subprocess.Popen([sys.executable, "-m", "jobs", "submit", str(spec), "--executor", "local",
                               "--run-id", run_id], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=e, cwd=REPO)
    jobs_json = tmp / "results" / run_id / "jobs.json"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            rec = json.loads(jobs_json.read_text())["stages"]["long"]
        except (FileNotFoundError, KeyError, ValueError):
            rec = {}
        if rec.get("state") == "RUNNING" and (tmp / "work" / run_id / "long" / "checkpoints").exists():
            pid = rec["pids"][0]
            return driver, pid, int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        time.sleep(0.2)
    driver.kill()
    pytest.fail("the stage never started: " + driver.communicate()[1][-2000:])


def process_alive(pid, start=None) -> bool:
    """pid is a live (not zombie) process, started at `start` clock ticks after boot where given."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] not in ("Z", "X") and (start is None or int(fields[19]) == start)


def gone_within(pid, start, seconds) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if not process_alive(pid, start):
            return True
        time.sleep(0.1)
    return False


@pytest.mark.slow   # ~40 s on 2 busy cores: four command lines and a resumed run
def test_kill_9_of_the_driver_status_cancel_and_resume(env):
    tmp, spec, e = env
    driver, pid, start = start_driver(tmp, spec, e, "k9")
    driver.send_signal(signal.SIGKILL)
    driver.wait(timeout=30)
    # the stage process does not live on without its driver
    assert gone_within(pid, start, 4), f"stage process {pid} outlived its driver"

    out = jobs_cli(e, "status", "k9", "--json")
    status = last_json(out)
    assert out.returncode == 1, out.stdout + out.stderr          # the run ended FAILED: status says so
    assert status["state"] == "FAILED" and status["exit_code"] == 1
    assert {n: s["state"] for n, s in status["stages"].items()} == {"long": "FAILED", "after": "CANCELLED"}
    assert status["stages"]["long"]["error"] == f"Terminated: stopped by SIGTERM (its driver, pid {driver.pid}, died)"
    assert "long FAILED" in out.stdout                            # the console shows the stage's error line

    out = jobs_cli(e, "cancel", "k9", "--json")
    assert out.returncode == 0, out.stderr
    assert set(last_json(out)["cancelled"]) == {"long: FAILED", "after: CANCELLED"}
    recs = json.loads((tmp / "results" / "k9" / "jobs.json").read_text())["stages"]
    assert (recs["long"]["state"], recs["after"]["state"]) == ("FAILED", "CANCELLED")   # recorded for good

    out = jobs_cli(e, "resume", "k9", "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    res = last_json(out)
    assert res["state"] == "COMPLETED" and res["resubmitted"] == ["long", "after"]
    final = json.loads((tmp / "work" / "k9" / "long" / "final.json").read_text())
    assert final["step"] == 40
    out = jobs_cli(e, "status", "k9")
    assert out.returncode == 0 and "COMPLETED" in out.stdout.splitlines()[0]


@pytest.mark.slow
def test_sigterm_of_the_driver_stops_its_stages_and_resume_finishes(env):
    tmp, spec, e = env
    driver, pid, start = start_driver(tmp, spec, e, "term")
    driver.send_signal(signal.SIGTERM)
    _, err = driver.communicate(timeout=60)
    assert driver.returncode == 128 + signal.SIGTERM
    assert err.strip().splitlines()[-1].startswith("error: stopped by SIGTERM")
    assert not process_alive(pid, start)        # stopped before the driver exited, not orphaned
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)                        # nothing left in the stage's process group either
    run_dir = tmp / "results" / "term"
    (row,) = [json.loads(p.read_text()) for p in (run_dir / "rows").glob("long__*.json")]
    assert row["state"] == "FAILED" and "SIGTERM" in row["error"]   # the stopped stage wrote its row

    out = jobs_cli(e, "status", "term", "--json")
    assert out.returncode == 1
    assert last_json(out)["state"] == "CANCELLED"
    assert {n: s["state"] for n, s in last_json(out)["stages"].items()} == {"long": "CANCELLED", "after": "CANCELLED"}
    out = jobs_cli(e, "cancel", "term")
    assert out.returncode == 0 and "nothing was running" in out.stdout

    out = jobs_cli(e, "resume", "term", "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    assert last_json(out)["state"] == "COMPLETED"


def test_status_of_a_dead_driver_is_not_fooled_by_a_reused_pid(env, monkeypatch):
    """The driver is named by pid and start time: a live process that now has its pid is not it."""
    tmp, spec, e = env
    from jobs import runs, spec as spec_mod
    monkeypatch.setenv("NANOCHAT_RESULTS_DIR", e["NANOCHAT_RESULTS_DIR"])
    monkeypatch.setenv("NANOCHAT_BASE_DIR", e["NANOCHAT_BASE_DIR"])
    run, run_dir = runs.create_run(spec_mod.load_pipeline(spec, []), "reused", "local", [])
    me = os.getpid()          # alive, but started at another time than the recorded driver
    (run_dir / "jobs.json").write_text(json.dumps({"executor": "local", "driver": {"pid": me, "start": 1, "host": os.uname().nodename},
                                                   "stages": {"long": {"state": "RUNNING", "pids": [me], "pid_starts": {str(me): 1}},
                                                              "after": {"state": "PENDING"}}}))
    status = runs.run_status(run_dir)
    assert status["state"] == "FAILED"
    assert {n: s["state"] for n, s in status["stages"].items()} == {"long": "FAILED", "after": "CANCELLED"}
    assert runs.cancel_run(run_dir) == ["long: FAILED", "after: CANCELLED"]     # and this process was not signalled


@pytest.mark.slow
def test_a_stage_killed_by_a_signal_says_so(env):
    """The driver lives, its stage is killed -9 (as the OOM killer does): FAILED with the reason on
    the console, its dependant CANCELLED, the command exits 1 and status agrees."""
    tmp, spec, e = env
    driver, pid, start = start_driver(tmp, spec, e, "oom")
    os.kill(pid, signal.SIGKILL)
    out, _ = driver.communicate(timeout=120)
    assert driver.returncode == 1
    assert "long: FAILED (exit -9: killed by SIGKILL; log " in out
    assert "  long FAILED: killed by SIGKILL" in out
    status = jobs_cli(e, "status", "oom", "--json")
    assert status.returncode == 1
    assert {n: s["state"] for n, s in last_json(status)["stages"].items()} == {"long": "FAILED", "after": "CANCELLED"}

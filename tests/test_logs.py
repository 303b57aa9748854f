"""`python -m jobs logs` (jobs/commands/logs.py): a stage's stdout/stderr, earlier attempts first, on the real
local Slurm (submitit's files) and for local runs; --task for arrays; --follow to the stage's end."""
import json
import os

import pytest
import yaml

from helpers import jobs_cli


def setup(tmp_path, name, stages):
    env = dict(os.environ, NANOCHAT_RESULTS_DIR=str(tmp_path / "results"), NANOCHAT_BASE_DIR=str(tmp_path / "work"))
    spec = tmp_path / f"{name}.yaml"
    spec.write_text(yaml.safe_dump({"name": name, "stages": stages}))
    return env, spec


def test_logs_of_a_slurm_stage_show_the_failed_attempt_then_the_resumed_one(tmp_path, local_slurm):
    env, spec = setup(tmp_path, "logs-slurm", {"a": {"kind": "noop", "args": {"fail_times": 1, "steps": 2}}})
    first = jobs_cli(env, "submit", str(spec), "--executor", "slurm", "--run-id", "lg", "--wait", "--json")
    assert first.returncode == 1, first.stdout + first.stderr
    second = jobs_cli(env, "resume", "lg", "--wait", "--json")
    assert second.returncode == 0, second.stdout + second.stderr
    out = jobs_cli(env, "logs", "lg", "a")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    # both jobs' files, the failed attempt first: its error is in its stderr, the second attempt's row completed
    assert text.count("==> a stdout") == 2 and text.count("==> a stderr") == 2
    assert "attempt 1 of 2" in text and "attempt 2 of 2" in text
    failed_at = text.index("asked to fail its first 1 attempt(s)")
    assert text.index("attempt 1 of 2") < failed_at < text.index("attempt 2 of 2")
    files = json.loads(jobs_cli(env, "logs", "lg", "--json").stdout.strip().splitlines()[-1])
    assert files["stage"] == "a" and all(f["exists"] for f in files["files"])
    assert files["files"][0]["path"].startswith(str(tmp_path / "work" / "lg" / "submitit" / "a"))


@pytest.mark.slow
def test_logs_of_a_local_array_task_and_bad_input(tmp_path):
    env, spec = setup(tmp_path, "logs-local", {"grid": {"kind": "noop", "variants": [
        {"name": "x", "args": {"steps": 1}}, {"name": "y", "args": {"fail": True}}]}})
    run = jobs_cli(env, "submit", str(spec), "--executor", "local", "--run-id", "ll")
    assert run.returncode == 1
    out = jobs_cli(env, "logs", "ll", "grid", "--task", "1")
    assert out.returncode == 0 and "noop stage asked to fail" in out.stdout
    assert str(tmp_path / "results" / "ll" / "logs" / "grid.1.log") in out.stdout
    # no STAGE: the first stage that failed; --follow ends on its own once the stage has ended
    out = jobs_cli(env, "logs", "ll", "--follow", "--tail", "3", timeout=60)
    assert out.returncode == 0 and "grid.0.log" in out.stdout and "==> grid: FAILED <==" in out.stdout
    bad = jobs_cli(env, "logs", "ll", "grid", "--task", "5")
    assert bad.returncode == 2 and "--task 5" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    bad = jobs_cli(env, "logs", "ll", "nostage")
    assert bad.returncode == 2 and "nostage" in bad.stderr

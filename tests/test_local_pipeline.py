"""The local executor (no Slurm): dependency order, arrays, failure -> dependants cancelled, resume,
cancel, rows on failure. The real smoke pipeline end to end: tests/test_smoke_run.py."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers import jobs_cli, rows

REPO = Path(__file__).resolve().parent.parent

PIPE = {
    "name": "localtest",
    "defaults": {"args": {"seconds": 0.2}},
    "stages": {
        "a": {"kind": "noop"},
        "b": {"kind": "noop", "depends_on": ["a"], "args": {"steps": 3, "checkpointable": True}},
        "c": {"kind": "noop", "depends_on": ["a"],
              "variants": [{"name": "x"}, {"name": "y", "args": {"steps": 2}}, {"name": "z"}]},
        "d": {"kind": "noop", "depends_on": ["b", "c"]},
    },
}


@pytest.fixture
def env(tmp_path):
    e = dict(os.environ, NANOCHAT_RESULTS_DIR=str(tmp_path / "results"), NANOCHAT_BASE_DIR=str(tmp_path / "work"))
    return tmp_path, e


@pytest.mark.slow
def test_local_run_orders_stages_runs_arrays_and_writes_rows(env):
    tmp, e = env
    spec = tmp / "p.yaml"
    spec.write_text(yaml.safe_dump(PIPE))
    out = jobs_cli(e, "submit", str(spec), "--executor", "local", "--run-id", "ok", "--max-parallel", "2", "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    run_dir = tmp / "results" / "ok"
    rs = rows(run_dir)
    assert sorted((r["stage"], r["variant"]) for r in rs) == [
        ("a", None), ("b", None), ("c", "x"), ("c", "y"), ("c", "z"), ("d", None)]
    assert all(r["state"] == "COMPLETED" and r["run_id"] == "ok" and r["git_commit"] for r in rs)
    # each stage started after its dependencies ended
    recs = json.loads((run_dir / "jobs.json").read_text())["stages"]
    for name, stage in PIPE["stages"].items():
        for dep in stage.get("depends_on", []):
            assert recs[name]["started_at"] >= recs[dep]["ended_at"], (name, dep)
    # the run folder has what status/resume/report need
    for f in ("resolved.yaml", "run.json", "jobs.json", "markers/a.done", "markers/c.2.done", "markers/d.done"):
        assert (run_dir / f).exists(), f
    # the checkpointable stage left its final state in <workdir>/<run_id>/<stage>/
    final = json.loads((tmp / "work" / "ok" / "b" / "final.json").read_text())
    assert final["step"] == 3


@pytest.mark.slow
def test_failed_stage_cancels_dependants_and_resume_reruns_only_those(env):
    tmp, e = env
    spec = tmp / "p.yaml"
    spec.write_text(yaml.safe_dump(PIPE))
    out = jobs_cli(e, "submit", str(spec), "--executor", "local", "--run-id", "f", "--set", "b.fail_times=1", "--json")
    assert out.returncode == 1
    last = json.loads(out.stdout.strip().splitlines()[-1])
    assert last["stages"] == {"a": "COMPLETED", "b": "FAILED", "c": "COMPLETED", "d": "CANCELLED"}
    run_dir = tmp / "results" / "f"
    failed = [r for r in rows(run_dir) if r["state"] == "FAILED"]
    assert len(failed) == 1 and failed[0]["stage"] == "b"
    assert "fail its first 1 attempt" in failed[0]["error"] and "\n" not in failed[0]["error"]
    before = {(r["stage"], r["variant"]) for r in rows(run_dir)}

    out = jobs_cli(e, "resume", "f", "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    last = json.loads(out.stdout.strip().splitlines()[-1])
    assert last["state"] == "COMPLETED" and last["resubmitted"] == ["b", "d"]
    new = [r for r in rows(run_dir) if r["state"] == "COMPLETED"]
    counts = {}
    for r in new:
        counts[(r["stage"], r["variant"])] = counts.get((r["stage"], r["variant"]), 0) + 1
    # a and c ran once (before); b and d once each after the resume
    assert counts == {("a", None): 1, ("c", "x"): 1, ("c", "y"): 1, ("c", "z"): 1, ("b", None): 1, ("d", None): 1}
    assert ("b", None) in before


def test_cancel_stops_a_running_local_run(env):
    tmp, e = env
    spec = tmp / "slow.yaml"
    spec.write_text(yaml.safe_dump({"name": "slow", "stages": {
        "long": {"kind": "noop", "args": {"seconds": 120}},
        "after": {"kind": "noop", "depends_on": ["long"]}}}))
    proc = subprocess.Popen([sys.executable, "-m", "jobs", "submit", str(spec), "--executor", "local",
                             "--run-id", "c", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=e, cwd=REPO)
    run_dir = tmp / "results" / "c"
    deadline = time.time() + 60
    while time.time() < deadline:
        recs = json.loads((run_dir / "jobs.json").read_text())["stages"] if (run_dir / "jobs.json").exists() else {}
        if recs.get("long", {}).get("state") == "RUNNING":
            break
        time.sleep(0.3)
    out = jobs_cli(e, "cancel", "c", "--json")
    assert out.returncode == 0
    assert json.loads(out.stdout.strip().splitlines()[-1])["cancelled"]
    stdout, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1
    last = json.loads(stdout.strip().splitlines()[-1])
    assert last["stages"] == {"long": "CANCELLED", "after": "CANCELLED"}


def test_stage_config_merges_defaults_variant_and_run_paths(env, monkeypatch):
    tmp, e = env
    monkeypatch.setenv("NANOCHAT_RESULTS_DIR", e["NANOCHAT_RESULTS_DIR"])
    monkeypatch.setenv("NANOCHAT_BASE_DIR", e["NANOCHAT_BASE_DIR"])
    from jobs import runs, spec, stages
    path = tmp / "p.yaml"
    path.write_text(yaml.safe_dump(PIPE))
    pipeline = spec.load_pipeline(path, ["b.init_from=a"])
    run, run_dir = runs.create_run(pipeline, "cfg", "local", [])
    reloaded = stages.load_run_pipeline(run_dir)          # what a node reads back from resolved.yaml
    cfg, variant = stages.build_config(run, reloaded, "b", None)
    assert cfg.seconds == 0.2 and cfg.steps == 3 and cfg.checkpointable is True     # defaults + own args
    assert cfg.out_dir == str(Path(run["workdir"]) / "cfg" / "b") and cfg.base_dir == run["workdir"]
    assert cfg.init_from == str(Path(run["workdir"]) / "cfg" / "a" / "checkpoints")  # a stage name -> its checkpoints
    cfg, variant = stages.build_config(run, reloaded, "c", 1)
    assert variant.name == "y" and cfg.steps == 2 and cfg.out_dir.endswith("/cfg/c/y")


def test_a_task_bound_to_fewer_cpus_than_it_asked_for_says_so_and_runs_that_many_threads(capsys, monkeypatch):
    import torch
    from jobs import stages
    binding = stages.check_cpu_binding({"SLURM_CPUS_PER_TASK": "8"}, affinity={0})
    assert binding == {"cpus_per_task": 8, "cpus_bound": 1, "srun_cpus_per_task": None}
    assert "bound to 1 CPU(s) but cpus_per_task is 8" in capsys.readouterr().err
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "8")
    before = torch.get_num_threads()
    try:
        stages._limit_threads(binding)
        assert torch.get_num_threads() == 1            # not 8 threads on one core
    finally:
        torch.set_num_threads(before)
    assert stages.check_cpu_binding({"SLURM_CPUS_PER_TASK": "2", "SRUN_CPUS_PER_TASK": "2"}, affinity={0, 1}) == \
        {"cpus_per_task": 2, "cpus_bound": 2, "srun_cpus_per_task": "2"}
    assert capsys.readouterr().err == ""

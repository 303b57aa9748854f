"""
Against a real Slurm (bash sbatch/slurm_local.sh up): submission through submitit with afterok
dependencies, failure propagation and resume, requeue on a preemption signal with resume from the
checkpoint, job arrays, a 2-task gloo stage, bad specs that submit nothing, and the smoke pipeline.
With CI=true these must run: no Slurm is then a failure, not a skip.

The requeue test is submitted first and checked last: a requeue cycle takes minutes on the local
Slurm (a requeued job waits before it is eligible again), and the other tests run meanwhile.
"""
import json
import math
import os
import subprocess
import time
from pathlib import Path

import pytest

from helpers import SMOKE_SHORT, jobs_cli, last_json, rows, sacct, sacct_state, wait_until, write_spec

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module")
def slurm(tmp_path_factory, local_slurm):
    root = tmp_path_factory.mktemp("slurm")
    env = dict(os.environ, NANOCHAT_RESULTS_DIR=str(root / "results"), NANOCHAT_BASE_DIR=str(root / "work"))
    return root, env


# -----------------------------------------------------------------------------
# Requeue: submitted first, checked by the last test

REQUEUE_STEPS = 40
_requeue = {}


def test_requeue_signal_checkpoints_and_requeues(slurm):
    root, env = slurm
    spec = write_spec(root, "requeue", {"train": {
        "kind": "noop", "args": {"steps": REQUEUE_STEPS, "seconds": 60.0, "checkpointable": True},
        "resources": {"time_min": 10, "max_requeues": 1}}})
    out = jobs_cli(env, "submit", str(spec), "--executor", "slurm", "--run-id", "requeue", "--json")
    assert out.returncode == 0
    info = last_json(out)
    job = info["jobs"]["train"]
    ckpt = root / "work" / "requeue" / "train" / "checkpoints" / "noop_state.json"
    # wait until it is training (a few steps checkpointed), then send the preemption signal
    assert wait_until(lambda: ckpt.exists() and json.loads(ckpt.read_text())["step"] >= 3, 180), "never started"
    subprocess.run(["scancel", "--signal=USR2", job], check=True, timeout=30)
    # the stage checkpoints at the next step boundary, writes a PREEMPTED row and requeues itself
    run_dir = Path(info["run_dir"])
    preempted = wait_until(lambda: [r for r in rows(run_dir) if r["state"] == "PREEMPTED"], 60)
    assert preempted and preempted[0]["requeues"] == 0
    extra = json.loads(preempted[0]["extra"])
    assert 3 <= extra["stopped_at_step"] < REQUEUE_STEPS
    _requeue.update(run_dir=run_dir, job=job, stopped_at=extra["stopped_at_step"])


# -----------------------------------------------------------------------------

def test_malformed_specs_exit_2_and_submit_nothing(slurm):
    root, env = slurm
    good = {"a": {"kind": "noop"}, "b": {"kind": "noop", "depends_on": ["a"]}}
    cases = {
        "unknown_arg": ({"a": {"kind": "noop", "args": {"secnds": 1}}}, "stages.a.args.secnds: unknown key (did you mean seconds?)"),
        "wrong_type": ({"a": {"kind": "noop", "args": {"steps": "many"}}}, "stages.a.args.steps: expected int"),
        "unknown_kind": ({"a": {"kind": "base_trian"}}, "stages.a.kind: unknown stage kind 'base_trian' (did you mean base_train?)"),
        "unknown_dep": ({"a": {"kind": "noop", "depends_on": ["x"]}}, "stages.a.depends_on: unknown stage 'x'"),
        "cycle": ({"a": {"kind": "noop", "depends_on": ["b"]}, "b": {"kind": "noop", "depends_on": ["a"]}}, "dependency cycle"),
        "bad_time": ({"a": {"kind": "noop", "resources": {"time_min": 0}}}, "stages.a.resources.time_min: 0 out of range"),
        "bad_nodes": ({"a": {"kind": "noop", "resources": {"nodes": "two"}}}, "stages.a.resources.nodes: expected int"),
        "unknown_resource": ({"a": {"kind": "noop", "resources": {"gpu": 1}}}, "stages.a.resources.gpu: unknown key"),
        "unknown_stage_key": ({"a": {"kind": "noop", "dependson": ["b"]}, "b": {"kind": "noop"}}, "stages.a.dependson: unknown key (did you mean depends_on?)"),
        "late_error": ({**good, "z": {"kind": "noop", "args": {"fail": "yes"}}}, "stages.z.args.fail: expected bool"),
        "no_stages": ({}, "stages: missing or empty"),
    }
    t_start = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(time.time() - 1))
    for name, (stages, needle) in cases.items():
        spec = write_spec(root, f"bad_{name}", stages)
        out = jobs_cli(env, "submit", str(spec), "--executor", "slurm")
        assert out.returncode == 2, name
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and str(spec) in lines[0] and needle in lines[0], (name, lines)
    out = jobs_cli(env, "submit", str(root / "missing.yaml"), "--executor", "slurm")
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [f"error: {root / 'missing.yaml'}: file not found"]
    # nothing reached Slurm: no job of these pipelines queued or recorded
    queued = subprocess.run(["squeue", "-h", "-o", "%j"], capture_output=True, text=True, timeout=30).stdout.split()
    assert not [j for j in queued if j.startswith("bad_")]
    recorded = subprocess.run(["sacct", "-X", "-n", "-P", "-S", t_start, "--format=JobName"],
                              capture_output=True, text=True, timeout=30).stdout.split()
    assert not [j for j in recorded if j.startswith("bad_")]


def test_failed_stage_cancels_dependants_and_resume_reruns_only_them(slurm):
    root, env = slurm
    spec = write_spec(root, "failres", {
        "a": {"kind": "noop"},
        "b": {"kind": "noop", "depends_on": ["a"], "args": {"fail_times": 1}},
        "c": {"kind": "noop", "depends_on": ["b"]},
        "d": {"kind": "noop", "depends_on": ["a"]},
    }, defaults={"resources": {"time_min": 5}})
    out = jobs_cli(env, "submit", str(spec), "--executor", "slurm", "--run-id", "failres", "--wait", "--json")
    assert out.returncode == 1
    first = last_json(out)
    assert first["stages"] == {"a": "COMPLETED", "b": "FAILED", "c": "CANCELLED", "d": "COMPLETED"}
    states = sacct(list(first["jobs"].values()))
    assert states[first["jobs"]["c"]]["state"] == "CANCELLED"       # kill-on-invalid-dep: nothing left pending
    run_dir = Path(first["run_dir"])
    failed = [r for r in rows(run_dir) if r["state"] == "FAILED"]
    assert [r["stage"] for r in failed] == ["b"] and failed[0]["job_id"] == first["jobs"]["b"]

    out = jobs_cli(env, "resume", "failres", "--wait", "--json")
    assert out.returncode == 0
    second = last_json(out)
    assert second["resubmitted"] == ["b", "c"] and set(second["jobs"]) == {"b", "c"}
    assert second["state"] == "COMPLETED"
    done = [(r["stage"], r["job_id"]) for r in rows(run_dir) if r["state"] == "COMPLETED"]
    assert sorted(s for s, _ in done) == ["a", "b", "c", "d"]        # a and d were not rerun
    assert dict(done)["b"] == second["jobs"]["b"]
    jobs = json.loads((run_dir / "jobs.json").read_text())["stages"]
    assert jobs["b"]["previous_job_ids"] == [first["jobs"]["b"]]


def test_array_of_eight_writes_every_row(slurm):
    root, env = slurm
    spec = write_spec(root, "array", {"grid": {
        "kind": "noop", "args": {"seconds": 2.0}, "resources": {"time_min": 5},
        "variants": [{"name": f"v{i}"} for i in range(8)]}})
    out = jobs_cli(env, "submit", str(spec), "--executor", "slurm", "--run-id", "array", "--wait", "--json")
    assert out.returncode == 0
    info = last_json(out)
    rs = rows(Path(info["run_dir"]))
    assert sorted(r["variant"] for r in rs) == [f"v{i}" for i in range(8)]
    assert sorted(r["array_task"] for r in rs) == list(range(8))
    assert all(r["state"] == "COMPLETED" and r["job_id"].startswith(info["jobs"]["grid"] + "_") for r in rs)


def test_two_task_distributed_stage_uses_gloo(slurm):
    root, env = slurm
    spec = write_spec(root, "dist", {"allreduce": {
        "kind": "noop", "args": {"all_reduce": True}, "resources": {"tasks_per_node": 2, "time_min": 5}}})
    out = jobs_cli(env, "submit", str(spec), "--executor", "slurm", "--run-id", "dist", "--wait", "--json")
    assert out.returncode == 0
    rs = rows(Path(last_json(out)["run_dir"]))
    assert len(rs) == 1                                # only rank 0 writes the row
    extra = json.loads(rs[0]["extra"])
    assert rs[0]["world_size"] == 2 and extra["all_reduce_sum"] == 3.0   # ranks 0 and 1 -> 1 + 2


def test_srun_carries_cpus_per_task_and_the_stage_reports_its_binding(slurm):
    # Slurm 22.05+ srun takes no --cpus-per-task from the allocation; the product exports it
    root, env = slurm
    spec = write_spec(root, "cpus", {"one": {
        "kind": "noop", "args": {"steps": 1}, "resources": {"cpus_per_task": 2, "time_min": 5}}})
    out = jobs_cli(env, "submit", str(spec), "--executor", "slurm", "--run-id", "cpus", "--wait", "--json")
    assert out.returncode == 0
    [row] = rows(Path(last_json(out)["run_dir"]))
    binding = json.loads(row["extra"])["cpu_binding"]
    assert binding["cpus_per_task"] == 2 and binding["srun_cpus_per_task"] == "2" and binding["cpus_bound"] >= 1
    [script] = (root / "work" / "cpus" / "submitit" / "one").glob("*_submission.sh")
    lines = script.read_text().splitlines()
    assert "export SRUN_CPUS_PER_TASK=2" in lines
    assert lines.index("export SRUN_CPUS_PER_TASK=2") < next(i for i, x in enumerate(lines) if x.startswith("srun"))


def test_smoke_pipeline_on_slurm_runs_every_stage_in_order(slurm):
    # the same pipeline (and the same cut) as the local smoke run (conftest.smoke_run), on the other executor
    root, env = slurm
    out = jobs_cli(env, "submit", "pipelines/smoke.yaml", "--executor", "slurm", "--run-id", "smoke",
                   "--wait", "--json", *[a for kv in SMOKE_SHORT for a in ("--set", kv)], timeout=900)
    assert out.returncode == 0
    info = last_json(out)
    print(f"submitted {len(info['jobs'])} stages in {info['submit_seconds']:.2f} s")
    order = ["probe", "base_train", "mid_train", "sft", "inference_bench"]
    assert set(info["jobs"]) == {"probe", "base_train", "batch_baseline", "mid_train", "sft", "sft_baselines", "inference_bench", "base_eval", "chat_eval"}
    acct = sacct(list(info["jobs"].values()))
    for stage, job in info["jobs"].items():
        # an array stage (sft_baselines) is one job whose tasks sacct lists as JOB_0, JOB_1, ...
        tasks = [k for k in acct if k == job or k.startswith(f"{job}_")]
        assert tasks and all(acct[k]["state"] == "COMPLETED" for k in tasks), (stage, tasks)
    for before, after in list(zip(order, order[1:])) + [("mid_train", "base_eval"), ("sft", "chat_eval")]:
        assert acct[info["jobs"][after]]["start"] >= acct[info["jobs"][before]]["end"], (before, after)
    rs = rows(Path(info["run_dir"]))
    # every stage completed; a benchmark variant may be SKIPPED where it cannot run (CUDA graphs on a CPU)
    assert {r["stage"] for r in rs if r["state"] == "COMPLETED"} == set(info["jobs"])
    assert {r["state"] for r in rs} <= {"COMPLETED", "SKIPPED"}


# -----------------------------------------------------------------------------

def _noop_final_weights(steps: int) -> list[float]:
    from jobs.stages import NoopConfig, run_noop
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        run_noop(NoopConfig(steps=steps, out_dir=d))
        return json.loads((Path(d) / "final.json").read_text())["weights"]


def test_requeued_stage_finishes_from_checkpoint_with_same_weights(slurm):
    root, env = slurm
    assert _requeue, "the requeue run was not submitted (see test_requeue_signal_checkpoints_and_requeues)"
    run_dir, job = _requeue["run_dir"], _requeue["job"]
    out = jobs_cli(env, "status", str(run_dir), "--json")
    assert out.returncode == 0
    done = wait_until(lambda: [r for r in rows(run_dir) if r["state"] == "COMPLETED"], 420, poll_s=5)
    assert done, "the requeued job did not finish"
    row = done[0]
    assert row["job_id"] == job and row["requeues"] == 1              # same job, restarted once
    extra = json.loads(row["extra"])
    assert extra["resumed_from_step"] >= _requeue["stopped_at"]      # resumed from its checkpoint, not step 0
    assert extra["final_step"] == REQUEUE_STEPS
    final = json.loads((root / "work" / "requeue" / "train" / "final.json").read_text())
    assert final["weights"] == _noop_final_weights(REQUEUE_STEPS)   # same as an uninterrupted run
    assert wait_until(lambda: sacct_state(job) == "COMPLETED", 60)
    assert not any(math.isnan(w) for w in final["weights"])


# -----------------------------------------------------------------------------
# The real training recipe: preempted, requeued, resumed, and bitwise the same as an uninterrupted run

def _final_model_state(run_root: Path, run_id: str, stage: str) -> dict:
    import torch
    ckpts = sorted((run_root / run_id / stage / "checkpoints").glob("step_*"))
    assert ckpts, f"no checkpoint under {run_root / run_id / stage}"
    return torch.load(ckpts[-1] / "model.pt", map_location="cpu", weights_only=True)


def test_base_train_requeued_on_signal_resumes_to_identical_weights(slurm):
    import torch
    root, env = slurm
    # the signal is sent once the first checkpoint (step 10) is there: 190 steps are left for it to land
    steps = 200
    spec = write_spec(root, "train-requeue", {"train": {
        "kind": "base_train",
        "args": {"depth": 2, "vocab_size": 512, "seq_len": 128, "device_batch_size": 8, "total_batch_size": 1024,
                 "num_steps": steps, "save_every": 10, "log_every": 20, "eval_tokens": 2048},
        "resources": {"cpus_per_task": 1, "time_min": 10, "max_requeues": 1}}})
    # one thread in both runs, so the arithmetic (and so the weights) can be compared bit for bit
    env = dict(env, OMP_NUM_THREADS="1")
    out = jobs_cli(env, "submit", str(spec), "--executor", "slurm", "--run-id", "train-requeue", "--json")
    assert out.returncode == 0
    info = last_json(out)
    job, run_dir = info["jobs"]["train"], Path(info["run_dir"])
    ckpt_root = root / "work" / "train-requeue" / "train" / "checkpoints"
    started = wait_until(lambda: list(ckpt_root.glob("step_*")) or [r for r in rows(run_dir) if r["state"] == "FAILED"], 300)
    assert started and not any(isinstance(r, dict) for r in started), f"training never wrote a checkpoint: {started}"
    subprocess.run(["scancel", "--signal=USR2", job], check=True, timeout=30)
    done = wait_until(lambda: [r for r in rows(run_dir) if r["state"] == "COMPLETED"], 420, poll_s=3)
    assert done, "the requeued training job did not finish"
    row = done[0]
    assert row["job_id"] == job and row["requeues"] == 1
    preempted = [r for r in rows(run_dir) if r["state"] == "PREEMPTED"]
    assert len(preempted) == 1
    stopped_at = json.loads(preempted[0]["extra"])["step"]
    assert 0 < stopped_at < steps                                   # stopped mid-way ...
    assert json.loads(row["extra"])["start_step"] == stopped_at      # ... and resumed there, not at 0
    # the same spec, uninterrupted, in a local process
    ref = jobs_cli(env, "submit", str(spec), "--executor", "local", "--run-id", "train-ref", "--wait", "--json")
    assert ref.returncode == 0
    resumed, uninterrupted = (_final_model_state(root / "work", r, "train") for r in ("train-requeue", "train-ref"))
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)

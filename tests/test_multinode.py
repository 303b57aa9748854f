"""
Multi-node for real: the local Slurm runs two slurmd daemons (nodes n1, n2) on this host
(bash sbatch/slurm_local.sh up, default --nodes 2), and every distributed path runs one rank per
node through submitit or srun + torchrun, over gloo.

First, without Slurm: the rendezvous (master address from the job's first node, a port from the job
id, one-line errors for an incomplete environment) and the bounded collective timeout.

The preemption test is submitted first and checked last (a requeue cycle takes a while); the other
Slurm tests run meanwhile. Its reference is the uninterrupted two-node run of the same spec.
"""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import jobs_cli, last_json, rows, sacct, sacct_state, wait_until, write_spec
from nanochat.checkpoint import list_checkpoints, load_checkpoint
from nanochat.distributed import _env_rank_info, _first_host, _slurm_master_addr, compute_init, rendezvous_port

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = str(Path(sys.executable).parent)


# ----------------------------------------------------------------------------- rendezvous (no Slurm)

def _bare_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **extra)
    return env


def test_port_from_the_job_id_differs_for_jobs_sharing_a_node():
    # the old 29500 + id % 1000 gave jobs 1000 apart the same port
    ports = {rendezvous_port(str(job)) for job in range(41_000, 51_000)}
    assert len(ports) == 10_000 and min(ports) >= 20_000 and max(ports) < 32_768   # below the ephemeral range
    assert rendezvous_port("41234") != rendezvous_port("42234")


@pytest.mark.parametrize("nodelist, first", [("n[1-2]", "n1"), ("gpu[07-09,12],cpu1", "gpu07"), ("a1,b2", "a1"),
                                             ("rack[3-4]-gpu", "rack3-gpu"), ("solo", "solo")])
def test_first_host_of_a_hostlist_without_scontrol(nodelist, first):
    assert _first_host(nodelist) == first


def test_master_address_is_the_first_node_as_scontrol_lists_it(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[07-09,12]")
    assert _slurm_master_addr() == "gpu07"
    # and without scontrol on PATH, the same name from the hostlist itself
    monkeypatch.setenv("PATH", VENV_BIN)
    assert _slurm_master_addr() == "gpu07"


@pytest.mark.parametrize("env, needle", [
    ({"RANK": "1"}, "RANK and WORLD_SIZE must be set together"),
    ({"WORLD_SIZE": "2"}, "RANK and WORLD_SIZE must be set together"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "rank 2 is not in a world of 2"),
    ({"SLURM_PROCID": "1", "SLURM_NTASKS": "2"}, "no SLURM_JOB_NODELIST"),
    ({"RANK": "1", "WORLD_SIZE": "2", "MASTER_PORT": "29999"}, "MASTER_ADDR is not set"),
    ({"RANK": "0", "WORLD_SIZE": "2", "NANOCHAT_DIST_TIMEOUT_S": "soon", "MASTER_ADDR": "127.0.0.1"},
     "NANOCHAT_DIST_TIMEOUT_S: 'soon'"),
])
def test_incomplete_environment_is_a_one_line_error(monkeypatch, env, needle):
    # before: half an environment ran as one process (RANK alone), or guessed 127.0.0.1 and waited
    for key in list(os.environ):
        if key.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "NANOCHAT_DIST")):
            monkeypatch.delenv(key)
    monkeypatch.delenv("MASTER_PORT", raising=False)   # compute_init may set it: restored at teardown
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(RuntimeError) as e:
        compute_init("cpu")
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert not torch.distributed.is_initialized()


def test_env_rank_info_reads_torchrun_then_srun():
    assert _env_rank_info({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == (1, 1, 4)
    assert _env_rank_info({"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0"}) == (1, 0, 2)
    assert _env_rank_info({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) == (0, 0, 1)


STUCK_PEER = """
import os, sys, time, torch, torch.distributed as dist
from nanochat.distributed import compute_init
info = compute_init("cpu")
if info.rank == 1:
    time.sleep(120)          # alive but never reaches the all-reduce (a hung node)
    sys.exit(0)
try:
    dist.all_reduce(torch.ones(4))
except Exception as e:
    print(f"RAISED {type(e).__name__}: {(str(e).splitlines() or [''])[0]}", flush=True)
    os._exit(3)
"""


@pytest.mark.slow
def test_collective_with_a_stuck_peer_fails_within_the_timeout():
    # before: gloo's default timeout (30 min) kept rank 0 waiting; now NANOCHAT_DIST_TIMEOUT_S bounds it
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-c", STUCK_PEER], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=_bare_env(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                                                       MASTER_PORT=str(port), NANOCHAT_DIST_TIMEOUT_S="5"))
             for r in range(2)]
    try:
        out, _ = procs[0].communicate(timeout=90)
    finally:
        procs[1].kill()
        procs[1].communicate()
    # gloo names the timeout it waited: the 5 s given, not the 600 s default (nor its own 30 min)
    assert procs[0].returncode == 3 and "RAISED" in out and "Timed out waiting 5000ms" in out, out[-2000:]


# ----------------------------------------------------------------------------- on the two-node Slurm

def _slurm_nodes() -> list[str]:
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, timeout=30).stdout
    return sorted({line.split()[0] for line in out.splitlines()
                   if line.split()[1].rstrip("*~#!%$@^-+") in {"idle", "mix", "alloc", "comp"}})


@pytest.fixture(scope="module")
def slurm2(tmp_path_factory, local_slurm):
    if len(_slurm_nodes()) < 2:
        msg = "the local Slurm has fewer than 2 usable nodes (bash sbatch/slurm_local.sh up --nodes 2)"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    root = tmp_path_factory.mktemp("multinode")
    # one thread per rank everywhere, so runs compare bit for bit
    env = dict(os.environ, PATH=VENV_BIN + os.pathsep + os.environ.get("PATH", ""), OMP_NUM_THREADS="1",
               NANOCHAT_RESULTS_DIR=str(root / "results"), NANOCHAT_BASE_DIR=str(root / "work"),
               NANOCHAT_DIST_TIMEOUT_S="60")
    return root, env


# what sacct says of a job that ran one rank on each of the two nodes
NODE_FIELDS = ("State", "NodeList", "NNodes")
ON_TWO_NODES = {"nodelist": "n[1-2]", "nnodes": "2"}


def extra(row: dict) -> dict:
    return json.loads(row["extra"] or "{}")


def final_weights(out_dir: Path) -> dict:
    ckpts = list_checkpoints(out_dir / "checkpoints")
    assert ckpts, f"no checkpoint under {out_dir}"
    return load_checkpoint(ckpts[-1], with_optim=False)["model"]


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


TWO_NODES = {"nodes": 2, "tasks_per_node": 1, "cpus_per_task": 1, "time_min": 10, "max_requeues": 1}
TRAIN_STEPS = 120
# num_streams=2 in every run: one process then reads exactly the rows the two ranks read (dataloader.py)
TRAIN_ARGS = {"depth": 2, "vocab_size": 512, "seq_len": 64, "device_batch_size": 4, "total_batch_size": 2 * 4 * 64,
              "num_steps": TRAIN_STEPS, "num_streams": 2, "save_every": 10, "keep_checkpoints": 50, "log_every": 20, "eval_tokens": 1024, "eval_every": 0}
_preempt = {}


def _two_node_train_spec(root: Path, name: str, **extra_stages) -> Path:
    return write_spec(root, name, {"train": {"kind": "base_train", "args": TRAIN_ARGS, "resources": TWO_NODES},
                                   **extra_stages})


@pytest.mark.slurm
@pytest.mark.slow
def test_two_node_stage_on_usr2_checkpoints_once_and_requeues(slurm2):
    root, env = slurm2
    spec = _two_node_train_spec(root, "mn-preempt")
    out = jobs_cli(env, "submit", str(spec), "--executor", "slurm", "--run-id", "mn-preempt", "--json")
    assert out.returncode == 0
    info = last_json(out)
    job, run_dir = info["jobs"]["train"], Path(info["run_dir"])
    ckpt_root = root / "work" / "mn-preempt" / "train" / "checkpoints"
    assert wait_until(lambda: list_checkpoints(ckpt_root), 300), "the two-node training never wrote a checkpoint"
    subprocess.run(["scancel", "--signal=USR2", job], check=True, timeout=30)
    preempted = wait_until(lambda: [r for r in rows(run_dir) if r["state"] == "PREEMPTED"], 120)
    assert preempted and len(preempted) == 1 and preempted[0]["world_size"] == 2
    _preempt.update(job=job, run_dir=run_dir, stopped_at=extra(preempted[0])["step"])


def _on_two_nodes_and_in_one_process(root, env, spec, run_id: str, stage: str):
    """Run `spec` on two Slurm nodes (one rank each), then the same spec in one local process, which
    accumulates 2 micro-batches to the same total batch. (Slurm run info, its row, the local row,
    final weights on two nodes, final weights in one process)."""
    out = jobs_cli(env, "submit", str(spec), "--executor", "slurm", "--run-id", run_id, "--wait", "--json")
    assert out.returncode == 0
    info = last_json(out)
    (row,) = rows(Path(info["run_dir"]))
    assert row["world_size"] == 2 and row["grad_accum_steps"] == 1
    ref = jobs_cli(env, "submit", str(spec), "--executor", "local", "--run-id", f"{run_id}-ref", "--wait", "--json")
    assert ref.returncode == 0
    (ref_row,) = rows(Path(last_json(ref)["run_dir"]))
    assert ref_row["world_size"] == 1 and ref_row["grad_accum_steps"] == 2
    work = root / "work"
    return info, row, ref_row, final_weights(work / run_id / stage), final_weights(work / f"{run_id}-ref" / stage)


@pytest.mark.slurm
@pytest.mark.slow
def test_base_train_on_two_nodes_matches_one_process(slurm2):
    root, env = slurm2
    spec = _two_node_train_spec(root, "mn-train")
    info, row, ref_row, two, one = _on_two_nodes_and_in_one_process(root, env, spec, "mn-train", "train")
    job = info["jobs"]["train"]
    assert sacct([job], NODE_FIELDS)[job] == {"state": "COMPLETED", **ON_TWO_NODES}      # one rank on each node
    print(f"max |w_two_nodes - w_one_process| = {max_diff(two, one):.3e}")
    assert max_diff(two, one) < 1e-4
    assert row["final_loss"] == pytest.approx(ref_row["final_loss"], rel=1e-4, abs=1e-4)
    _preempt["reference"] = two


@pytest.mark.slurm
@pytest.mark.slow
def test_sft_pack_mode_on_two_nodes_matches_one_process(slurm2):
    root, env = slurm2
    spec = write_spec(root, "mn-sft", {"sft": {
        "kind": "sft", "resources": TWO_NODES,
        "args": {"mode": "eager-pack", "depth": 2, "vocab_size": 512, "seq_len": 128, "num_conversations": 96,
                 "val_conversations": 8, "device_batch_size": 2, "total_batch_size": 2 * 2 * 128, "max_steps": 4}}})
    info, row, ref_row, two, one = _on_two_nodes_and_in_one_process(root, env, spec, "mn-sft", "sft")
    assert sacct([job := info["jobs"]["sft"]], NODE_FIELDS)[job].items() >= ON_TWO_NODES.items()
    assert row["variant"] == "eager-pack"
    print(f"sft: max |w_two_nodes - w_one_process| = {max_diff(two, one):.3e}")
    assert max_diff(two, one) < 1e-4


@pytest.mark.slurm
@pytest.mark.slow
def test_batch_size_probe_on_two_nodes_ranks_agree(slurm2):
    # device_batch_size 0 and no cache: both ranks probe in the run and must agree on one size (a
    # rank that chose another would take a different number of micro-steps and break the all-reduce)
    root, env = slurm2
    args = {**TRAIN_ARGS, "device_batch_size": 0, "total_batch_size": 2 * 8 * 64, "num_steps": 3, "save_every": 0}
    spec = write_spec(root, "mn-probe", {"train": {"kind": "base_train", "args": args, "resources": TWO_NODES}})
    out = jobs_cli(env, "submit", str(spec), "--executor", "slurm", "--run-id", "mn-probe", "--wait", "--json")
    assert out.returncode == 0
    info = last_json(out)
    assert sacct([job := info["jobs"]["train"]], NODE_FIELDS)[job].items() >= ON_TWO_NODES.items()
    (row,) = rows(Path(info["run_dir"]))
    assert row["state"] == "COMPLETED" and row["world_size"] == 2 and row["batch_size_source"] == "probe"
    assert row["device_batch_size"] * row["grad_accum_steps"] == 8
    meta = load_checkpoint(list_checkpoints(root / "work" / "mn-probe" / "train" / "checkpoints")[-1], with_optim=False)["meta"]
    # each rank read its own stream and advanced it by the same agreed number of rows
    loaders = meta["loader"]
    assert sorted(loaders) == ["0", "1"] and [loaders[r]["stream"] for r in ("0", "1")] == [0, 1]
    assert [{k: loaders[r][k] for k in ("epoch", "group", "offset")} for r in ("0", "1")].count(
        {k: loaders["0"][k] for k in ("epoch", "group", "offset")}) == 2, {r: {k: v for k, v in l.items() if k != "buffer"} for r, l in loaders.items()}


@pytest.mark.slurm
@pytest.mark.slow
def test_base_train_multinode_sbatch_runs_torchrun_on_two_nodes(slurm2):
    root, env = slurm2
    out_dir = root / "mn-sbatch-out"
    sub = subprocess.run(["sbatch", "--parsable", "--nodes=2", "--gpus-per-node=0", "--cpus-per-task=1",
                          f"--output={root}/mn-sbatch-%j.out", "sbatch/base_train_multinode.sbatch",
                          "--depth", "2", "--seq-len", "64", "--total-batch-size", "0", "--num-steps", "2",
                          "--device-type", "cpu", "--vocab-size", "512", "--device-batch-size", "4",
                          "--eval-tokens", "1024", "--eval-every", "0", "--save-every", "0"],
                         capture_output=True, text=True, cwd=REPO, timeout=60,
                         env=dict(env, NPROC_PER_NODE="1", OUT_DIR=str(out_dir)))
    assert sub.returncode == 0, sub.stderr
    job = sub.stdout.strip().split(";")[0]
    not_yet = {"PENDING", "RUNNING", "REQUEUED"}
    done = wait_until(lambda: (a := sacct([job], NODE_FIELDS).get(job)) and a["state"] not in not_yet and a, 300, 2)
    log = (root / f"mn-sbatch-{job}.out").read_text()
    assert done and done == {"state": "COMPLETED", **ON_TWO_NODES}, (done, log[-3000:])
    assert f"rendezvous n1:{rendezvous_port(job)}" in log
    results = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert results and all(r["world_size"] == 2 and r["steps"] == 2 and r["state"] == "COMPLETED" for r in results)


def _rank_pid(job: str, procid: int) -> int | None:
    """The pid of the job's task `procid` (submitit's python) on this host."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = dict(kv.split("=", 1) for kv in (proc / "environ").read_bytes().decode(errors="replace").split("\0") if "=" in kv)
            cmd = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if env.get("SLURM_JOB_ID") == job and env.get("SLURM_PROCID") == str(procid) and "submitit" in cmd and "python" in cmd:
            return int(proc.name)
    return None


@pytest.mark.slurm
@pytest.mark.slow
def test_killed_rank_fails_the_stage_promptly_and_resume_continues(slurm2):
    root, env = slurm2
    spec = _two_node_train_spec(root, "mn-kill", after={"kind": "noop", "depends_on": ["train"]})
    out = jobs_cli(env, "submit", str(spec), "--executor", "slurm", "--run-id", "mn-kill", "--json")
    assert out.returncode == 0
    info = last_json(out)
    job, run_dir = info["jobs"]["train"], Path(info["run_dir"])
    ckpt_root = root / "work" / "mn-kill" / "train" / "checkpoints"
    assert wait_until(lambda: list_checkpoints(ckpt_root), 300), "the two-node training never wrote a checkpoint"
    pid = wait_until(lambda: _rank_pid(job, 1), 30)
    assert pid, "rank 1 (node n2) not found"
    node = dict(kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0") if "=" in kv)["SLURMD_NODENAME"]
    assert node == "n2"
    os.kill(pid, signal.SIGKILL)
    # promptly: within this generous deadline, far below the job's 10-minute limit (NANOCHAT_DIST_TIMEOUT_S=60
    # bounds rank 0's wait), and as a failure of the job itself, not Slurm's time limit
    assert wait_until(lambda: sacct_state(job) not in {"", "PENDING", "RUNNING", "COMPLETING"}, 180, 1)
    assert sacct_state(job) == "FAILED", sacct_state(job)
    after = info["jobs"]["after"]
    assert wait_until(lambda: sacct_state(after) == "CANCELLED", 60), sacct_state(after)   # kill-on-invalid-dep
    status = jobs_cli(env, "status", str(run_dir), "--json")
    stages = {name: st["state"] for name, st in last_json(status)["stages"].items()}
    assert stages == {"train": "FAILED", "after": "CANCELLED"}, stages
    failed = [r for r in rows(run_dir) if r["state"] == "FAILED"]
    assert [r["stage"] for r in failed] == ["train"]
    last_ckpt = int(list_checkpoints(ckpt_root)[-1].name.split("_")[-1])
    res = jobs_cli(env, "resume", "mn-kill", "--wait", "--json", timeout=900)
    assert res.returncode == 0
    second = last_json(res)
    assert second["resubmitted"] == ["train", "after"] and second["state"] == "COMPLETED"
    done = [r for r in rows(run_dir) if r["state"] == "COMPLETED" and r["stage"] == "train"]
    assert done and done[0]["world_size"] == 2
    assert extra(done[0])["start_step"] == last_ckpt > 0 and extra(done[0])["step"] == TRAIN_STEPS   # from the last checkpoint


@pytest.mark.slurm
@pytest.mark.slow
def test_two_node_preempted_stage_resumes_to_identical_weights(slurm2):
    root, env = slurm2
    assert _preempt.get("job"), "the preemption run was not submitted"
    assert "reference" in _preempt, "no uninterrupted two-node reference (test_base_train_on_two_nodes_matches_one_process)"
    run_dir, job = _preempt["run_dir"], _preempt["job"]
    done = wait_until(lambda: [r for r in rows(run_dir) if r["state"] == "COMPLETED"], 420, poll_s=3)
    assert done, "the requeued two-node job did not finish"
    row = done[0]
    assert row["job_id"] == job and row["requeues"] == 1 and row["world_size"] == 2
    assert extra(row)["start_step"] == _preempt["stopped_at"] and 0 < _preempt["stopped_at"] < TRAIN_STEPS
    # both ranks caught the signal (one on each node) and stopped at the same step: one checkpoint there
    logs = sorted((root / "work" / "mn-preempt" / "submitit" / "train").glob(f"{job}_*_log.out"))
    assert len(logs) == 2 and all("caught signal" in p.read_text() for p in logs), [p.name for p in logs]
    ckpts = list_checkpoints(root / "work" / "mn-preempt" / "train" / "checkpoints")
    at_stop = [p for p in ckpts if int(p.name.split("_")[-1]) == _preempt["stopped_at"]]
    assert len(at_stop) == 1                                  # the stop checkpoint, holding both ranks' loaders
    assert sorted(load_checkpoint(at_stop[0], with_optim=False)["meta"]["loader"]) == ["0", "1"]
    resumed = final_weights(root / "work" / "mn-preempt" / "train")
    assert all(torch.equal(resumed[k], _preempt["reference"][k]) for k in resumed)   # bit for bit
    assert wait_until(lambda: sacct_state(job) == "COMPLETED", 60)


def test_srun_ranks_ignore_a_rendezvous_inherited_from_the_submitting_shell(monkeypatch):
    # A job inherits its submitter's environment: a MASTER_PORT left there (by an earlier in-process
    # run, or a user's shell) named one port for every job, so concurrent jobs collided. Under srun the
    # job's own first node and job-id port win. (init_process_group is stopped right after the env is set.)
    for key in list(os.environ):
        if key.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_")):
            monkeypatch.delenv(key)
    monkeypatch.setenv("PATH", VENV_BIN)   # no scontrol: the hostlist itself is read
    for key, value in {"SLURM_JOB_ID": "1234", "SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0",
                       "SLURM_JOB_NODELIST": "n[1-2]", "MASTER_PORT": "20000", "MASTER_ADDR": "stale-host"}.items():
        monkeypatch.setenv(key, value)

    class Stop(Exception):
        pass

    def stop(**kw):
        raise Stop
    monkeypatch.setattr(torch.distributed, "init_process_group", stop)
    with pytest.raises(Stop):
        compute_init("cpu")
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == ("n1", str(rendezvous_port(1234)))

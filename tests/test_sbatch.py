"""
sbatch/: the grid runner (jobs.array) on its own, the sbatch scripts' headers against their grids,
and, against the local Slurm (bash sbatch/slurm_local.sh up), idempotent `up`, an 8-task array
writing all its rows with sacct seeing every task COMPLETED, the submitter's venv inside a job, the
inference array over a tiny grid, and the multi-node torchrun script (1 node x 2 CPU ranks).
With CI=true the Slurm tests must run: no Slurm is then a failure, not a skip.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from jobs.array import load_grid
from nanochat.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
SBATCH = REPO / "sbatch"
VENV_BIN = str(Path(sys.executable).parent)
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL",
            "DEADLINE"}


def array_cli(*argv, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "jobs.array", *argv], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=timeout)


def read_rows(results_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((results_dir / "rows").glob("*.json"))]


# ----------------------------------------------------------------------------- grids (no Slurm)

def test_grid_product_rows_and_defaults(tmp_path):
    g = tmp_path / "g.yaml"
    g.write_text(yaml.safe_dump({"name": "demo", "kind": "bench", "defaults": {"seq_len": 64, "depth": 1},
                                 "rows": [{"depth": 9}],
                                 "grid": {"depth": [2, 4], "num_samples": [1, 8]}}))
    grid = load_grid(g)
    assert grid["name"] == "demo" and grid["kind"] == "bench"
    # explicit rows first, then the product with the first key varying slowest; defaults fill the rest
    assert grid["rows"] == [{"seq_len": 64, "depth": 9},
                            {"seq_len": 64, "depth": 2, "num_samples": 1}, {"seq_len": 64, "depth": 2, "num_samples": 8},
                            {"seq_len": 64, "depth": 4, "num_samples": 1}, {"seq_len": 64, "depth": 4, "num_samples": 8}]
    out = array_cli(str(g), "--count")
    assert out.returncode == 0 and out.stdout.strip() == "5"


@pytest.mark.parametrize("spec, key", [
    ({"grid": {"depth": [2]}, "colour": "red"}, "colour"),
    ({"grid": {"depth": []}}, "grid.depth"),
    ({"rows": [3]}, "rows[0]"),
    ({"defaults": {"a": 1}}, "no rows"),
    ({"grid": {"task": [1, 2]}}, "task"),
])
def test_bad_grid_is_config_error_naming_file_and_key(tmp_path, spec, key):
    g = tmp_path / "bad.yaml"
    g.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match=re.escape(key)) as e:
        load_grid(g)
    assert str(g) in str(e.value)
    out = array_cli(str(g), "--task", "0", "--", "true")
    assert out.returncode == 2 and str(g) in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_task_runs_command_and_writes_row(tmp_path):
    g = tmp_path / "g.yaml"
    g.write_text(yaml.safe_dump({"name": "cheap", "kind": "bench", "grid": {"depth": [2, 3], "x": [5, 7]}}))
    res = tmp_path / "res"
    code = "import json; print('some log'); print(json.dumps(dict(tokens_per_s={x} * 1.5, depth={depth}, ttft_s=0.25)))"
    out = array_cli(str(g), "--task", "3", "--run-id", "r1", "--results-dir", str(res), "--", "{python}", "-c", code)
    assert out.returncode == 0, out.stderr
    assert "some log" in out.stdout                      # the command's output reaches the job log
    (row,) = read_rows(res)
    assert row["run_id"] == "r1" and row["stage"] == "cheap" and row["kind"] == "bench"
    assert row["state"] == "COMPLETED" and row["error"] is None and row["array_task"] == 3
    assert row["depth"] == 3 and row["tokens_per_s"] == 10.5      # result columns filled from the JSON line
    extra = json.loads(row["extra"])
    assert extra["ttft_s"] == 0.25 and extra["grid_row"] == {"depth": 3, "x": 7} and extra["x"] == 7
    assert row["wall_time_s"] > 0 and row["git_commit"]


def test_failures_still_write_a_row(tmp_path):
    g = tmp_path / "g.yaml"
    g.write_text(yaml.safe_dump({"name": "f", "rows": [{"code": 3}]}))
    res = tmp_path / "res"
    out = array_cli(str(g), "--task", "0", "--results-dir", str(res), "--",
                    "{python}", "-c", "import sys; print('boom', file=sys.stderr); sys.exit({code})")
    assert out.returncode == 3                            # Slurm sees the command's exit code
    out = array_cli(str(g), "--task", "0", "--results-dir", str(res), "--", "{python}", "-c", "print('not json')")
    assert out.returncode == 1
    rows = {json.loads(r["extra"])["command"].split()[-1]: r for r in read_rows(res)}
    assert len(rows) == 2 and all(r["state"] == "FAILED" for r in rows.values())
    errors = sorted(r["error"] for r in rows.values())
    assert errors[0].startswith("exit code 3: boom") and "not a JSON object" in errors[1]


def test_sigterm_passes_to_the_command_and_the_row_is_still_written(tmp_path):
    g = tmp_path / "g.yaml"
    g.write_text(yaml.safe_dump({"name": "slow", "rows": [{"secs": 120}]}))
    res = tmp_path / "res"
    proc = subprocess.Popen([sys.executable, "-m", "jobs.array", str(g), "--task", "0", "--results-dir", str(res),
                             "--", "{python}", "-c", "import time; print('started', flush=True); time.sleep({secs})"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "started"   # the command runs: now stop it as scancel would
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode != 0
    (row,) = read_rows(res)
    assert row["state"] == "FAILED" and "SIGTERM" in row["error"]


def test_unknown_placeholder_and_task_out_of_range_are_bad_input(tmp_path):
    g = tmp_path / "g.yaml"
    g.write_text(yaml.safe_dump({"grid": {"depth": [2, 4]}}))
    res = tmp_path / "res"
    out = array_cli(str(g), "--task", "0", "--results-dir", str(res), "--", "echo", "{width}")
    assert out.returncode == 2 and "{width}" in out.stderr and str(g) in out.stderr
    out = array_cli(str(g), "--task", "2", "--results-dir", str(res), "--", "echo", "{depth}")
    assert out.returncode == 2 and "--array=0-1" in out.stderr
    env = {k: v for k, v in os.environ.items() if k != "SLURM_ARRAY_TASK_ID"}
    out = array_cli(str(g), "--results-dir", str(res), "--", "echo", "{depth}", env=env)
    assert out.returncode == 2 and "SLURM_ARRAY_TASK_ID" in out.stderr
    assert not (res / "rows").exists()                    # bad input runs nothing


@pytest.mark.parametrize("script, grid", [("probe_array.sbatch", "probe_grid.yaml"),
                                          ("inference_array.sbatch", "inference_grid.yaml")])
def test_sbatch_array_range_matches_its_grid(script, grid):
    text = (SBATCH / script).read_text()
    m = re.search(r"^#SBATCH --array=0-(\d+)%(\d+)$", text, re.M)
    assert m, f"{script}: no throttled --array=0-N%M line"
    assert int(m.group(1)) + 1 == len(load_grid(SBATCH / grid)["rows"])
    assert re.search(r"^#SBATCH --output=\S*%A_%a\S*$", text, re.M)
    # every placeholder in the script's command template is a parameter of each row
    fields = set(re.findall(r"\{(\w+)\}", text.split("-m jobs.array", 1)[1])) - {"python"}
    for row in load_grid(SBATCH / grid)["rows"]:
        assert fields <= set(row), (script, fields - set(row))


def test_scripts_parse():
    for script in [SBATCH / "slurm_local.sh", *SBATCH.glob("*.sbatch")]:
        out = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert out.returncode == 0, (script, out.stderr)
    out = subprocess.run(["bash", str(SBATCH / "slurm_local.sh"), "sideways"], capture_output=True, text=True)
    assert out.returncode == 2 and "usage" in out.stderr


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("runuser"), reason="needs root to run as another user")
def test_up_refuses_clearly_when_it_cannot_run_the_daemons():
    out = subprocess.run(["runuser", "-u", "nobody", "--", "bash", str(SBATCH / "slurm_local.sh"), "up"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "ERROR" in out.stderr and "root" in out.stderr


# ----------------------------------------------------------------------------- against the local Slurm


@pytest.fixture(scope="module")
def slurm(tmp_path_factory, local_slurm):
    root = tmp_path_factory.mktemp("sbatch")
    # the job inherits the submitter's environment: the venv first on PATH, results under tmp
    env = dict(os.environ, PATH=VENV_BIN + os.pathsep + os.environ.get("PATH", ""),
               NANOCHAT_RESULTS_DIR=str(root / "results"), NANOCHAT_BASE_DIR=str(root / "work"))
    return root, env


def sbatch(env, *argv) -> str:
    out = subprocess.run(["sbatch", "--parsable", *argv], capture_output=True, text=True, cwd=REPO, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0]


def wait_sacct(job_id: str, n_tasks: int, timeout_s: float = 240) -> dict[str, str]:
    """Poll sacct until n_tasks allocations of job_id are in a terminal state; returns {jobid: state}."""
    deadline = time.monotonic() + timeout_s
    states: dict[str, str] = {}
    while time.monotonic() < deadline:
        out = subprocess.run(["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "JobID,State"],
                             capture_output=True, text=True, timeout=30)
        states = dict(line.split("|")[:2] for line in out.stdout.split() if "|" in line)
        states = {k: v.split()[0] for k, v in states.items() if "[" not in k}   # "J_[0-7]" = still pending
        if len(states) == n_tasks and all(s in TERMINAL for s in states.values()):
            return states
        time.sleep(1)
    raise AssertionError(f"job {job_id}: sacct after {timeout_s}s: {states}")


@pytest.mark.slurm
def test_slurm_local_up_is_idempotent(slurm):
    pid_file = Path(os.environ.get("NANOCHAT_SLURM_DIR", "/tmp/nanochat-slurm")) / "run" / "slurmctld.pid"
    before = pid_file.read_text().strip() if pid_file.exists() else None
    for _ in range(2):
        out = subprocess.run(["bash", str(SBATCH / "slurm_local.sh"), "up"], capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr
    assert "already up" in out.stderr                     # the second call finds it up and starts nothing
    after = pid_file.read_text().strip()
    assert before is None or before == after              # no daemon was restarted
    state = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True).stdout.split()
    assert state and state[0] in {"idle", "mix", "alloc"}
    status = subprocess.run(["bash", str(SBATCH / "slurm_local.sh"), "status"], capture_output=True, text=True)
    assert status.returncode == 0 and "slurmctld: running" in status.stdout and "slurmdbd: running" in status.stdout


@pytest.mark.slurm
def test_job_runs_with_the_submitters_venv(slurm):
    root, env = slurm
    log = root / "venv-%j.out"
    job = sbatch(env, f"--output={log}", "--wrap",
                 "python -c 'import sys, torch; print(sys.executable, torch.__version__)'")
    assert wait_sacct(job, 1) == {job: "COMPLETED"}
    printed = (root / f"venv-{job}.out").read_text()
    assert printed.split()[0].startswith(VENV_BIN)


@pytest.mark.slurm
def test_array_of_8_writes_every_row_and_sacct_sees_them_completed(slurm):
    root, env = slurm
    grid = root / "cheap.yaml"
    grid.write_text(yaml.safe_dump({
        "name": "cheap", "kind": "bench", "grid": {"depth": [1, 2, 3, 4], "num_samples": [1, 2]},
        "command": ["{python}", "-c", "import json; print(json.dumps(dict(depth={depth}, "
                                      "tokens_per_s={depth} * {num_samples} * 1.0, task={task})))"]}))
    job = sbatch(env, "--array=0-7%8", f"--output={root}/%x-%A_%a.out", "sbatch/grid_array.sbatch", str(grid))
    states = wait_sacct(job, 8)
    assert states == {f"{job}_{i}": "COMPLETED" for i in range(8)}
    rows = read_rows(root / "results" / job)
    assert len(rows) == 8
    by_task = {r["array_task"]: r for r in rows}
    assert sorted(by_task) == list(range(8))
    for task, row in by_task.items():
        params = load_grid(grid)["rows"][task]
        assert row["job_id"] == f"{job}_{task}" and row["run_id"] == job and row["state"] == "COMPLETED"
        assert row["tokens_per_s"] == params["depth"] * params["num_samples"]
        assert json.loads(row["extra"])["task"] == task
    assert len(list((root / "results" / job / "rows").glob(".*.tmp"))) == 0


@pytest.mark.slurm
@pytest.mark.slow
def test_inference_array_over_a_tiny_grid(slurm):
    root, env = slurm
    grid = root / "inference_tiny.yaml"
    grid.write_text(yaml.safe_dump({"name": "inference", "kind": "inference_bench",
                                    "defaults": {"prompt_len": 16, "new_tokens": 8},
                                    "grid": {"depth": [2], "num_samples": [1, 2]}}))
    job = sbatch(dict(env, RUN_ID="inference-tiny"), "--array=0-1", "--gpus-per-node=0",
                 f"--output={root}/%x-%A_%a.out", "sbatch/inference_array.sbatch", str(grid),
                 "--vocab-size", "512", "--diversity-samples", "4")
    assert wait_sacct(job, 2) == {f"{job}_0": "COMPLETED", f"{job}_1": "COMPLETED"}
    rows = read_rows(root / "results" / "inference-tiny")
    assert sorted(r["array_task"] for r in rows) == [0, 1]
    for row in rows:
        extra = json.loads(row["extra"])
        assert row["state"] == "COMPLETED" and row["depth"] == 2 and row["kind"] == "inference_bench"
        assert extra["command"].endswith("--vocab-size 512 --diversity-samples 4")
        assert extra["variants"]["kv-eager"]["tokens_per_s"] > 0    # the benchmark's own figures are kept


@pytest.mark.slurm
@pytest.mark.slow
def test_base_train_multinode_script_on_one_node_two_cpu_ranks(slurm):
    root, env = slurm
    out_dir = root / "mn-out"
    job = sbatch(dict(env, NPROC_PER_NODE="2", OUT_DIR=str(out_dir)), "--nodes=1", "--gpus-per-node=0",
                 "--cpus-per-task=2", f"--output={root}/mn-%j.out", "sbatch/base_train_multinode.sbatch",
                 "--depth", "2", "--seq-len", "64", "--total-batch-size", "0", "--num-steps", "2",
                 "--device-type", "cpu", "--vocab-size", "512", "--device-batch-size", "4",
                 "--eval-tokens", "1024", "--eval-every", "0", "--save-every", "0")
    assert wait_sacct(job, 1, timeout_s=300) == {job: "COMPLETED"}, (root / f"mn-{job}.out").read_text()[-3000:]
    results = [json.loads(line) for line in (root / f"mn-{job}.out").read_text().splitlines() if line.startswith("{")]
    assert results and all(r["world_size"] == 2 and r["steps"] == 2 and r["state"] == "COMPLETED" for r in results)
    assert (out_dir / "checkpoints").is_dir()

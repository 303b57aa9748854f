"""What the orchestration tests share: running `python -m jobs`, reading what a run wrote, waiting,
and asking the local Slurm (sacct, squeue) about a job. Imported as `helpers` (pytest puts tests/
on sys.path, next to conftest.py)."""
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent


def jobs_cli(env, *argv, timeout=600):
    """`python -m jobs ARGV` from the checkout; its output's tail is printed (pytest shows it on a failure)."""
    out = subprocess.run([sys.executable, "-m", "jobs", *argv], capture_output=True, text=True, env=env,
                         cwd=REPO, timeout=timeout)
    print(out.stdout[-4000:], out.stderr[-4000:])
    return out


def last_json(out) -> dict:
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_spec(root: Path, name: str, stages: dict, **top) -> Path:
    p = root / f"{name}.yaml"
    p.write_text(yaml.safe_dump({"name": name, **top, "stages": stages}))
    return p


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((Path(run_dir) / "rows").glob("*.json"))]


def wait_until(predicate, timeout_s: float, poll_s: float = 1.0):
    """predicate()'s first true value within timeout_s, else its last (false) value."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    return predicate()


def sacct(job_ids, fields=("State", "Start", "End")) -> dict[str, dict[str, str]]:
    """{job id: {field in lower case: value}} from Slurm accounting, one line per job (no steps);
    the state is its first word ("CANCELLED by 0" -> "CANCELLED")."""
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-j", ",".join(job_ids), f"--format=JobID,{','.join(fields)}"],
                         capture_output=True, text=True, timeout=60).stdout
    res = {}
    for line in out.splitlines():
        jid, *values = line.split("|")
        res[jid] = {name.lower(): value for name, value in zip(fields, values)}
        if "state" in res[jid]:
            res[jid]["state"] = (res[jid]["state"].split() or [""])[0]
    return res


def sacct_state(job_id: str) -> str:
    """The job's state in Slurm accounting, "" while it has no record."""
    return sacct([job_id]).get(job_id, {}).get("state", "")


def squeue_state(job_id: str) -> str:
    """The job's state in the queue, "" once it has left it."""
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=30)
    return out.stdout.strip()


def path_without_slurm(tmp: Path) -> str:
    """A PATH with everything in /usr/bin except the Slurm client commands (as on a laptop)."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    slurm = {"sbatch", "sinfo", "squeue", "sacct", "scancel", "scontrol", "srun", "salloc", "sacctmgr"}
    for p in Path("/usr/bin").iterdir():
        if p.name not in slurm:
            (bin_dir / p.name).symlink_to(p)
    return f"{Path(sys.executable).parent}:{bin_dir}"


# The smoke pipeline cut short: every stage and every variant, a few steps each (what the tests
# check is that each stage runs and hands on its outputs, not how far the tiny model trains).
SMOKE_SHORT = ["base_train.num_steps=4", "base_train.save_every=0", "base_train.log_every=2",
               "base_train.eval_tokens=2048", "batch_baseline.num_steps=2", "batch_baseline.log_every=1",
               "mid_train.num_steps=2", "sft.max_steps=2", "sft.num_conversations=40", "sft_baselines.max_steps=2",
               "sft_baselines.num_conversations=40", "inference_bench.new_tokens=8", "base_eval.max_per_task=2",
               "chat_eval.max_per_task=1"]


def pretraining_base(base: Path, vocab: int) -> Path:
    """A base dir with 3 small pretraining shards (Python's own text) and a `vocab`-token tokenizer
    trained on them: what the training tests read."""
    from nanochat.prepare import ensure_pretraining_data, ensure_tokenizer
    data = ensure_pretraining_data(base, num_shards=3, max_chars=400_000, row_group_size=16)
    ensure_tokenizer(base, vocab, data_path=data)
    return base


class StepClock:
    """A clock that moves only when told: a test's step function advances it by the seconds that step
    is to take, and the code under test (the batch-size probe's timings, contention check and time
    limit) reads it instead of the machine's clock, so its verdict cannot depend on the load."""

    def __init__(self, start: float = 1000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

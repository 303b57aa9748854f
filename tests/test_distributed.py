"""Two real gloo processes match one process at the same total batch."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from nanochat.checkpoint import list_checkpoints, load_checkpoint
from helpers import pretraining_base

VOCAB = 512
REPO = Path(__file__).resolve().parents[1]

# Each process runs base training and prints its result row; num_streams=2 in both set-ups so the
# single process reads exactly the rows the two ranks read (dataloader.py).
CHILD = """
import json, sys
from nanochat.recipes.base_train import BaseTrainConfig, run
cfg = BaseTrainConfig(**json.loads(sys.argv[1]))
print("ROW " + json.dumps(run(cfg), default=str), flush=True)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(code: str, args: list[str], world_size: int, timeout: int = 300) -> list[str]:
    """Run `code` in world_size processes (a gloo group when more than one); every one must exit 0.
    Returns each rank's output."""
    port = _free_port()
    procs = []
    for rank in range(world_size):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK"))}
        if world_size > 1:
            env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        env["OMP_NUM_THREADS"] = "1"
        procs.append(subprocess.Popen([sys.executable, "-c", code, *args], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = []
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        assert p.returncode == 0, out[-3000:]
        outs.append(out)
    return outs


def _launch(cfg: dict, world_size: int) -> list[dict]:
    return [json.loads([l for l in out.splitlines() if l.startswith("ROW ")][-1][4:])
            for out in _spawn(CHILD, [json.dumps(cfg)], world_size)]


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process(tmp_path):
    base = pretraining_base(tmp_path / "base", VOCAB)
    common = dict(base_dir=str(base), vocab_size=VOCAB, depth=2, seq_len=64, device_batch_size=4,
                  total_batch_size=2 * 4 * 64, num_steps=6, num_streams=2, eval_tokens=1024, num_shards=3,
                  data_max_chars=400_000, device_type="cpu")
    (one,) = _launch({**common, "out_dir": str(tmp_path / "one")}, 1)
    two = _launch({**common, "out_dir": str(tmp_path / "two")}, 2)
    assert one["world_size"] == 1 and one["grad_accum_steps"] == 2
    assert [r["world_size"] for r in two] == [2, 2] and two[0]["grad_accum_steps"] == 1
    # every rank reports the same (all-reduced) loss and val bpb
    assert two[0]["final_loss"] == two[1]["final_loss"] and two[0]["val_bpb"] == two[1]["val_bpb"]
    assert two[0]["final_loss"] == pytest.approx(one["final_loss"], rel=1e-5, abs=1e-5)
    assert two[0]["val_bpb"] == pytest.approx(one["val_bpb"], rel=1e-5)
    a = load_checkpoint(list_checkpoints(tmp_path / "one" / "checkpoints")[-1])
    b = load_checkpoint(list_checkpoints(tmp_path / "two" / "checkpoints")[-1])
    max_diff = max((a["model"][k] - b["model"][k]).abs().max().item() for k in a["model"])
    print(f"max |w_one - w_two| = {max_diff:.3e}")
    assert max_diff < 1e-4, max_diff
    # the two-rank checkpoint holds both ranks' loader positions, so it resumes on any world size
    assert sorted(b["meta"]["loader"]) == ["0", "1"] and b["meta"]["loader"] == a["meta"]["loader"]


# After compute_cleanup no gloo worker thread may survive: one that outlives the interpreter can
# abort the process at exit while it releases a finished all-reduce's tensors (a CI run saw exit
# -6 after a successful 2-rank training). Importing torch._dynamo after init is what model builds
# and torch.compile do; it used to pin the default process group.
TEARDOWN_CHILD = """
import os, torch, torch.distributed as dist
from nanochat.distributed import compute_cleanup, compute_init
compute_init("cpu")
import torch._dynamo  # noqa: F401  (late import, as the meta-device model build does)
t = torch.ones(8)
dist.all_reduce(t)
compute_cleanup()
names = [open(f"/proc/self/task/{tid}/comm").read().strip() for tid in os.listdir("/proc/self/task")]
print("GLOO_THREADS", sorted(n for n in names if "gloo" in n), flush=True)
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_cleanup_stops_gloo_threads():
    for out in _spawn(TEARDOWN_CHILD, [], 2, timeout=120):
        assert "GLOO_THREADS []" in out, out[-2000:]

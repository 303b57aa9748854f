"""SFT under faults: a real out-of-memory mid-run (the step is rerun smaller, the total batch kept, the
smaller size kept across a restart), one rank out of memory, and a stop request seen by one rank only."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# Shared by the children: a tokenizer and conversations made the same way in every process.
# The model's vocabulary (32768) is far larger than the tokenizer's (512): its logits, several
# float copies of (rows x T x vocab), dominate a step's memory, so the memory a step needs grows
# clearly with the device batch (by ~200 MB per two rows here) and a memory limit can sit between
# two batch sizes.
COMMON = r"""
import json, os, sys, time
import torch
import nanochat.optim
nanochat.optim._NS_DTYPE_CPU = torch.float32   # as the fp32_muon fixture: equal splits give equal steps
from nanochat.recipes.sft import SFTConfig, conversation_texts, render_examples
from nanochat.training.sft_loop import train
from nanochat.gpt import GPT, GPTConfig, build_model
from nanochat.synthetic import generate_conversations
from nanochat.tokenizer import Tokenizer

T, VOCAB = 256, int(os.environ.get("TEST_VOCAB", "32768"))
convs = generate_conversations(48, seed=7, max_tokens=T)
tok = Tokenizer.train(conversation_texts(convs), 512)
examples = render_examples(convs, tok, T, "test")

def fresh_model(cls=GPT):
    torch.manual_seed(0)
    model = build_model(GPTConfig.from_depth(2, VOCAB, T))
    if cls is not GPT:
        model.__class__ = cls
    return model

def config(B, total, **kw):
    return SFTConfig(mode=kw.pop("mode", "eager-dynamic"), seq_len=T, device_batch_size=B, total_batch_size=total,
                     max_steps=kw.pop("max_steps", 4), init_lr_frac=1.0, val_conversations=0, seed=0, **kw)

def params(model):
    return [p.detach().clone() for p in model.parameters()]

def vm(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
"""

# One process: a reference run at device batch 2 (x2 accumulation), then the same training configured
# at device batch 4 under an address-space limit (RLIMIT_AS) set halfway between what batch 2 and
# batch 4 need, so batch 4 really fails in the CPU allocator. It is preempted after two steps and
# restarted without the limit: the restart must keep the fallback's batch 2.
REAL_OOM_CHILD = COMMON + r"""
import resource
out_dir = sys.argv[1]
ref = fresh_model()
ref_row = train(config(2, 4 * T), ref, tok, examples, [], 2, "config")
peak_2 = vm("VmPeak")
probe = fresh_model()                       # what batch 4 needs (same step, on a throwaway model)
train(config(4, 4 * T, max_steps=1), probe, tok, examples, [], 4, "config")
peak_4 = vm("VmPeak")
del probe
limit = (peak_2 + peak_4) // 2
soft, hard = resource.getrlimit(resource.RLIMIT_AS)
resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
model = fresh_model()
calls = []
stop_after_two = lambda: (calls.append(1), len(calls) >= 2)[1]
first = train(config(4, 4 * T, out_dir=out_dir), model, tok, examples, [], 4, "config", stop_after_two)
resource.setrlimit(resource.RLIMIT_AS, (hard, hard))
model = fresh_model()
second = train(config(4, 4 * T, out_dir=out_dir), model, tok, examples, [], 4, "config")
diff = max((a - b).abs().max().item() for a, b in zip(params(ref), params(model)))
print("RESULT " + json.dumps({
    "peak_2": peak_2, "peak_4": peak_4, "limit": limit, "max_diff": diff,
    "ref": [ref_row["device_batch_size"], ref_row["grad_accum_steps"], ref_row["steps"], ref_row["final_loss"]],
    "first": [first["state"], first["device_batch_size"], first["grad_accum_steps"], first["batch_size_source"],
              first["steps"], first["total_batch_size"]],
    "second": [second["state"], second["device_batch_size"], second["grad_accum_steps"], second["batch_size_source"],
               second["steps"], second["extra"]["resumed_from_step"], second["final_loss"]]}), flush=True)
"""


def _run_child(code, args, env_extra=None, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_ARENA_MAX="1", MALLOC_MMAP_THRESHOLD_="131072",
               PYTHONPATH=str(REPO), **(env_extra or {}))
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout


def _result(out):
    return json.loads([l for l in out.splitlines() if l.startswith("RESULT ")][-1][7:])


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc for VmPeak")
def test_real_out_of_memory_reruns_the_step_smaller_and_a_restart_keeps_it(tmp_path):
    out = _run_child(REAL_OOM_CHILD, [str(tmp_path / "sft")])
    r = _result(out)
    print(r)
    assert r["peak_4"] - r["peak_2"] > 64 * 2 ** 20, r   # batch 4 really needs more than batch 2
    assert "out of memory at step 0" in out             # the allocator refused batch 4 under the limit
    assert r["ref"][:3] == [2, 2, 4]
    # the first attempt fell back to 2 x 2 (the same 4 rows per step) and took its two steps
    assert r["first"] == ["PREEMPTED", 2, 2, "config+oom_fallback", 2, 4 * 256]   # configured: stays the fixed side
    # the restart (no limit now, configured at 4) keeps the fallback's size from the checkpoint
    assert r["second"][:6] == ["COMPLETED", 2, 2, "config+oom_fallback", 2, 2]
    # no step lost or repeated: the weights are those of the run configured at 2 x 2 from the start
    assert r["max_diff"] == 0.0, r
    assert r["second"][6] == r["ref"][3]


# Two gloo ranks (or one process), configured at device batch CONFIG_B (4) and 4 rows per rank and step. With OOM_RANK set, that rank's model
# fails to allocate (the CPU allocator's own error, for an impossible request) whenever it is handed
# more than 2 rows; with STOP_RANK set, only that rank's stop flag is raised, after its second step.
RANKS_CHILD = COMMON + r"""
from nanochat.distributed import compute_cleanup, compute_init
info = compute_init("cpu")
out_dir = sys.argv[1]

class FailsAboveTwoRows(GPT):
    def forward(self, idx, *args, **kwargs):
        if idx.size(0) > 2:
            torch.empty(1 << 62, dtype=torch.uint8)
        return super().forward(idx, *args, **kwargs)

oom_rank, stop_rank = int(os.environ.get("OOM_RANK", "-1")), int(os.environ.get("STOP_RANK", "-1"))
model = fresh_model(FailsAboveTwoRows if info.rank == oom_rank else GPT)
calls = []
def should_stop():
    calls.append(1)
    return info.rank == stop_rank and len(calls) >= 2
B = int(os.environ.get("CONFIG_B", "4"))
cfg = config(B, 4 * T * 2, out_dir=out_dir, mode=os.environ.get("MODE", "eager-dynamic"))
row = train(cfg, model, tok, examples, [], B, "config", should_stop)
torch.save(params(model), os.path.join(out_dir, f"params_{info.world_size}_{info.rank}.pt"))
print("RESULT " + json.dumps({k: row[k] for k in ("state", "steps", "device_batch_size", "grad_accum_steps",
                                                   "batch_size_source", "total_batch_size", "final_loss")}), flush=True)
compute_cleanup()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ranks(out_dir, world_size, timeout=180, **env_extra):
    """Run RANKS_CHILD on world_size gloo ranks; a rank that has not finished within `timeout`
    seconds (a hang in a collective) fails the test, and every rank is killed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    procs = []
    for rank in range(world_size):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK"))}
        env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), TEST_VOCAB="2048", **env_extra)
        if world_size > 1:
            env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, "-c", RANKS_CHILD, str(out_dir)], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=timeout)
            assert p.returncode == 0, out[-3000:]
            outs.append(out)
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"a rank did not finish within {timeout} s (hung in a collective?)")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [_result(o) for o in outs], outs


@pytest.mark.slow
def test_one_rank_out_of_memory_both_fall_back_and_match_two_ranks_configured_smaller(tmp_path, fp32_muon):
    """Only rank 1 runs out of memory: both ranks learn of it before the gradient all-reduce, both
    rerun the step at 2 x 2, and the weights equal those of two ranks configured at 2 x 2."""
    rows, outs = _ranks(tmp_path / "two", 2, OOM_RANK="1")
    assert "out of memory at step 0" in outs[0]   # rank 0 fell back because rank 1 ran out
    for r in rows:
        assert (r["state"], r["device_batch_size"], r["grad_accum_steps"], r["batch_size_source"]) == \
            ("COMPLETED", 2, 2, "config+oom_fallback")
        assert r["total_batch_size"] == 4 * 256 * 2 and r["steps"] == 4
    ref_rows, _ = _ranks(tmp_path / "ref", 2, CONFIG_B="2")
    assert (ref_rows[0]["device_batch_size"], ref_rows[0]["grad_accum_steps"]) == (2, 2)
    p0, p1 = (torch.load(tmp_path / "two" / f"params_2_{r}.pt") for r in (0, 1))
    ref = torch.load(tmp_path / "ref" / "params_2_0.pt")
    for a, b, c in zip(p0, p1, ref):
        assert torch.equal(a, b) and torch.equal(a, c)   # the same micro-batches: bit for bit
    assert rows[0]["final_loss"] == rows[1]["final_loss"] == ref_rows[0]["final_loss"]


@pytest.mark.slow
def test_stop_flag_on_one_rank_stops_both_at_the_same_step(tmp_path):
    """USR2 reached rank 1 only: the ranks agree before acting, both leave after the same step (no
    hang in the next all-reduce), and that step's checkpoint is written."""
    from nanochat.checkpoint import latest_valid_checkpoint
    rows, _ = _ranks(tmp_path / "run", 2, timeout=120, STOP_RANK="1")
    assert [(r["state"], r["steps"]) for r in rows] == [("PREEMPTED", 2), ("PREEMPTED", 2)]
    found = latest_valid_checkpoint(tmp_path / "run" / "checkpoints", "cpu")
    assert found is not None and found["meta"]["step"] == 2


@pytest.mark.slow
def test_preempted_run_saves_before_it_evaluates(tmp_path, monkeypatch):
    """On preemption the grace period goes to the checkpoint: an evaluation that would fail (or outlast
    the grace period) after the last step must not cost the trained steps."""
    from nanochat.recipes import sft as chat_sft
    from nanochat.training import sft_loop
    from nanochat.checkpoint import latest_valid_checkpoint
    real_evaluate, calls = sft_loop.evaluate, []

    def evaluate_then_die(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:   # the first call is the loss before training
            raise RuntimeError("killed at the time limit while evaluating")
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(sft_loop, "evaluate", evaluate_then_die)
    cfg = chat_sft.SFTConfig(out_dir=str(tmp_path / "sft"), mode="eager-dynamic", num_conversations=60,
                             val_conversations=4, seq_len=128, device_batch_size=4, depth=2, vocab_size=512,
                             max_steps=6, device_type="cpu")
    stops = []
    row = chat_sft.run(cfg, should_stop=lambda: (stops.append(1), len(stops) >= 2)[1])
    assert row["state"] == "PREEMPTED" and row["steps"] == 2
    found = latest_valid_checkpoint(tmp_path / "sft" / "checkpoints", "cpu")
    assert found is not None and found["meta"]["step"] == 2
    assert (found["meta"]["plan_batch_size"], found["meta"]["plan_grad_accum"]) == (4, 1)
    # The batch geometry in a checkpoint's meta is untrusted: nonsense there is ignored, not a crash.
    meta_path = Path(found["path"]) / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta.update(plan_batch_size="4", plan_grad_accum=[1], device_batch_size=True, batch_size_source="fallback")
    meta_path.write_text(json.dumps(meta))
    monkeypatch.setattr(sft_loop, "evaluate", real_evaluate)
    row = chat_sft.run(cfg)
    assert row["state"] == "COMPLETED" and row["extra"]["resumed_from_step"] == 2
    assert (row["device_batch_size"], row["batch_size_source"]) == (4, "config")

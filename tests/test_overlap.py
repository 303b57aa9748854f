"""The training loop does not wait on the host (issue 14, goal 4), proven with two real gloo ranks:
the next step's rows are read while this step computes (dataloader.StepRows), gradients are
all-reduced in buckets during the last micro-batch's backward (optim.GradientBuckets), and each rank
runs Muon's Newton-Schulz on its share of the matrices only (Muon.shard). overlap: false is the
plain path; both train to the same weights."""
import contextlib
import json
import socket
import threading
import time

import pytest
import torch

from nanochat.checkpoint import list_checkpoints, load_checkpoint
from nanochat.dataloader import StepRows
from nanochat.prepare import ensure_pretraining_data, ensure_tokenizer
from tests.test_distributed import _spawn

VOCAB = 320
STEPS = 3

# Each rank trains and prints a timeline of what happened, in order. The wrappers only record and
# pass through; the one wait (before an optimizer step, for the next step's rows) lets the prefetch
# thread finish on a busy machine: without a prefetch it times out and the timeline says so.
CHILD = """
import json, sys, threading, time
import torch, torch.distributed as dist
import nanochat.optim as optim
from nanochat.dataloader import StepRows
from nanochat.recipes.base_train import BaseTrainConfig, run

optim.BUCKET_MB = 0.02  # several buckets even for this tiny model
lock = threading.Lock()

def log(*e):
    with lock:
        events.append(list(e))

take = StepRows._take
def counted_take(self):
    out = take(self)
    prepared[0] += 1
    log("rows", prepared[0], threading.current_thread() is threading.main_thread())
    return out
StepRows._take = counted_take

muon_step = optim.Muon.step
def timed_step(self):
    k = steps_done[0] + 1
    deadline = time.time() + 10
    while cfg.overlap and k < cfg.num_steps and prepared[0] < k + 1 and time.time() < deadline:
        time.sleep(0.01)
    log("opt", k, prepared[0])
    ns_calls.append(0)
    muon_step(self)
    log("ns", k, ns_calls[-1], sum(1 for g in self.param_groups for p in g["params"] if p.grad is not None))
    steps_done[0] = k
optim.Muon.step = timed_step

ns = optim.zeropower_via_newtonschulz5
def counted_ns(G, *a, **kw):  # matrices orthogonalised: a stack of one shape counts each of its matrices
    ns_calls[-1] += G.size(0) if G.dim() == 3 else 1
    return ns(G, *a, **kw)
optim.zeropower_via_newtonschulz5 = counted_ns

autograd_backward = torch.autograd.backward
def logged_backward(*a, **kw):
    # a compiled region's backward is one autograd node: log when each starts
    todo, seen = [a[0].grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if "CompiledFunction" in node.name():
            node.register_prehook(lambda grad_outputs: log("compiled_bw"))
        todo.extend(n for n, _ in node.next_functions)
    log("bw_start")
    autograd_backward(*a, **kw)
    log("bw_end")
torch.autograd.backward = logged_backward

grad_ready = optim.GradientBuckets._grad_ready
def logged_grad_ready(self, p):
    log("grad", self.armed)
    grad_ready(self, p)
optim.GradientBuckets._grad_ready = logged_grad_ready

all_reduce = dist.all_reduce
def logged_all_reduce(tensor, *a, **kw):
    log("all_reduce", tensor.numel(), bool(kw.get("async_op")))
    return all_reduce(tensor, *a, **kw)
dist.all_reduce = logged_all_reduce

finish = optim.GradientBuckets.finish
def logged_finish(self, apply=True):
    finish(self, apply)
    storages = {b.untyped_storage().data_ptr() for b in self.buffers}
    log("grads_in_buckets", all(p.grad is not None and p.grad.untyped_storage().data_ptr() in storages
                                for b in self.buckets for p in b))
optim.GradientBuckets.finish = logged_finish

import nanochat.gpt
nanochat.gpt.COMPILE_BACKEND = "aot_eager"  # dynamo + AOTAutograd: the regions and autograd graph inductor gets

# rank 1 runs out of memory (the allocator's real error) on any training micro-batch of more than one row
from nanochat.gpt import GPT
gpt_forward = GPT.forward
def forward_oom_on_rank_1(self, idx, *a, **kw):
    if torch.is_grad_enabled() and idx.size(0) > 1 and dist.get_rank() == 1:
        torch.empty(1 << 62, dtype=torch.uint8)
    return gpt_forward(self, idx, *a, **kw)

import os
for arg in sys.argv[1:]:  # every run in the same two processes, one after the other
    arg = json.loads(arg)
    # each run meets on a port of its own: a rank that finished a run early would otherwise reach the
    # next rendezvous while its peer still serves the last one's store on the same port, and both wait
    os.environ["MASTER_PORT"] = str(arg["port"])
    cfg = BaseTrainConfig(**arg["cfg"])
    GPT.forward = forward_oom_on_rank_1 if arg["oom"] else gpt_forward
    events, prepared, steps_done, ns_calls = [], [0], [0], []
    row = run(cfg)
    print("EVENTS " + json.dumps(events), flush=True)
    print("ROW " + json.dumps(row, default=str), flush=True)
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two-rank trainings, overlapped and plain, of the same tiny model on the same data."""
    tmp = tmp_path_factory.mktemp("overlap")
    base = tmp / "base"
    data = ensure_pretraining_data(base, num_shards=3, max_chars=120_000, row_group_size=8)
    ensure_tokenizer(base, VOCAB, data_path=data)
    # 2 micro-batches of 2 rows per rank and step: only the second may launch communication
    common = dict(base_dir=str(base), vocab_size=VOCAB, depth=1, seq_len=32, device_batch_size=2,
                  total_batch_size=2 * 2 * 2 * 32, num_steps=STEPS, save_every=1, keep_checkpoints=STEPS,
                  eval_tokens=64, num_shards=3, data_max_chars=120_000, device_type="cpu", log_every=1)
    names = ("overlap", "plain", "overlap-oom", "plain-oom", "overlap-compile", "plain-compile", "overlap-compile-oom")
    with contextlib.ExitStack() as held:  # distinct free ports, one per run
        socks = [held.enter_context(socket.socket()) for _ in names]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        ports = [sock.getsockname()[1] for sock in socks]
    outs = _spawn(CHILD, [json.dumps({"cfg": {**common, "out_dir": str(tmp / n), "overlap": n.startswith("overlap"),
                                              "compile": "on" if "compile" in n else "off"},
                                      "oom": n.endswith("oom"), "port": port}) for n, port in zip(names, ports)],
                  2, timeout=300)
    out = {}
    for i, name in enumerate(names):
        out[name] = {
            "dir": tmp / name,
            "events": [json.loads([l for l in o.splitlines() if l.startswith("EVENTS ")][i][7:]) for o in outs],
            "rows": [json.loads([l for l in o.splitlines() if l.startswith("ROW ")][i][4:]) for o in outs],
        }
    return out


def _steps(events: list) -> list[list]:
    """The timeline cut at each optimizer step: events up to and including step k's 'opt'."""
    cuts, cur = [], []
    for e in events:
        cur.append(e)
        if e[0] == "ns":
            cuts.append(cur)
            cur = []
    return cuts


@pytest.mark.slow
@pytest.mark.parametrize("compiled", [False, True])
def test_overlapped_weights_equal_the_plain_path(runs, compiled):
    overlap, plain = ("overlap-compile", "plain-compile") if compiled else ("overlap", "plain")
    for step in range(1, STEPS + 1):
        a = load_checkpoint(list_checkpoints(runs[overlap]["dir"] / "checkpoints")[step - 1])
        b = load_checkpoint(list_checkpoints(runs[plain]["dir"] / "checkpoints")[step - 1])
        assert a["meta"]["step"] == b["meta"]["step"] == step
        diff = max((a["model"][k] - b["model"][k]).abs().max().item() for k in a["model"])
        assert diff <= 1e-6, (step, diff)
        # the saved loader position is after the rows trained, not after the prefetched ones
        assert a["meta"]["loader"] == b["meta"]["loader"], step
        for sa, sb in zip(a["optim"], b["optim"]):  # Muon's momentum is whole on every rank: same state
            for i in sb["state"]:
                for k, v in sb["state"][i].items():
                    assert torch.allclose(sa["state"][i][k], v, atol=1e-6, rtol=0), (step, i, k)
    o, p = runs[overlap]["rows"], runs[plain]["rows"]
    assert o[0]["final_loss"] == o[1]["final_loss"] == pytest.approx(p[0]["final_loss"], abs=1e-6)
    assert all(r["compile"] is compiled for r in o + p)


def test_out_of_memory_on_one_rank_reruns_the_step_on_both(runs):
    # rank 1 fails in its first micro-batch while rank 0 finishes both and sends its buckets; rank 1
    # sends the buckets it never reached, everyone drops the sums and reruns the rows one by one
    for name in ("overlap-oom", "plain-oom"):
        rows = runs[name]["rows"]
        assert [(r["device_batch_size"], r["grad_accum_steps"], r["state"]) for r in rows] == [(1, 4, "COMPLETED")] * 2
        assert rows[0]["batch_size_source"] == "config+oom_fallback"
    for a_path, b_path in zip(list_checkpoints(runs["overlap-oom"]["dir"] / "checkpoints"),
                              list_checkpoints(runs["plain-oom"]["dir"] / "checkpoints")):
        a, b = load_checkpoint(a_path), load_checkpoint(b_path)
        diff = max((a["model"][k] - b["model"][k]).abs().max().item() for k in a["model"])
        assert diff <= 1e-6 and a["meta"]["loader"] == b["meta"]["loader"], (a_path, diff)
    assert len(list_checkpoints(runs["overlap-oom"]["dir"] / "checkpoints")) == STEPS
    # compiled by region, the same: nobody waits in a collective, and the step is rerun row by row
    rows = runs["overlap-compile-oom"]["rows"]
    assert [(r["device_batch_size"], r["grad_accum_steps"], r["state"], r["compile"]) for r in rows] == \
        [(1, 4, "COMPLETED", True)] * 2
    assert len(list_checkpoints(runs["overlap-compile-oom"]["dir"] / "checkpoints")) == STEPS
    # (not compared with the unfailed run: another micro-batch split moves sums by 1e-7, and AdamW's
    # first step, sign(g) * lr, turns that into whole-lr differences where a gradient is near 0)


def test_next_rows_are_read_before_this_steps_optimizer_step(runs):
    for events in runs["overlap"]["events"]:
        opts = [e for e in events if e[0] == "opt"]
        assert [e[1] for e in opts] == list(range(1, STEPS + 1))
        for _, k, prepared in opts[:-1]:
            assert prepared == k + 1, f"step {k}'s optimizer step ran before step {k + 1}'s rows were read"
        rows = [e for e in events if e[0] == "rows"]
        assert len(rows) == STEPS and not any(main for _, _, main in rows)  # all read by the prefetch thread
    for events in runs["plain"]["events"]:  # the plain path reads each step's rows when it starts
        assert [e[2] for e in events if e[0] == "opt"] == list(range(1, STEPS + 1))


def test_gradient_buckets_are_all_reduced_during_the_last_backward(runs):
    for events in runs["overlap"]["events"]:
        for k, step in enumerate(_steps(events), 1):
            starts = [i for i, e in enumerate(step) if e[0] == "bw_start"]
            ends = [i for i, e in enumerate(step) if e[0] == "bw_end"]
            assert len(starts) == len(ends) == 2, step  # two micro-batches
            buckets = [i for i, e in enumerate(step) if e[0] == "all_reduce" and e[2]]
            assert len(buckets) > 1, step
            # nothing is sent during the first micro-batch's backward; only accumulated
            assert not any(starts[0] < i < ends[0] for i in buckets)
            assert all(not e[1] for e in step[starts[0]:ends[0]] if e[0] == "grad")
            # the first bucket leaves before the last gradient of the last backward is ready
            last_grad = max(i for i, e in enumerate(step) if e[0] == "grad")
            assert starts[1] < buckets[0] < last_grad < ends[1], step
    for events in runs["plain"]["events"]:  # the plain path: one flat all-reduce after backward
        for step in _steps(events):
            assert not any(e[0] == "grad" for e in step)
            end = max(i for i, e in enumerate(step) if e[0] == "bw_end")
            flat = [i for i, e in enumerate(step) if e[0] == "all_reduce" and e[1] > 1000]
            assert len(flat) == 1 and flat[0] > end


def test_under_compile_buckets_leave_while_compiled_backward_still_runs(runs):
    # compiled as one graph, backward is one autograd node and every gradient is ready only after it:
    # compiled by region (gpt.CompiledGPT), a bucket is on its way before the last region's backward starts
    for events in runs["overlap-compile"]["events"]:
        for step in _steps(events):
            starts = [i for i, e in enumerate(step) if e[0] == "bw_start"]
            ends = [i for i, e in enumerate(step) if e[0] == "bw_end"]
            assert len(starts) == len(ends) == 2, step
            regions = [i for i in range(starts[1], ends[1]) if step[i][0] == "compiled_bw"]
            buckets = [i for i in range(starts[1], ends[1]) if step[i][0] == "all_reduce" and step[i][2]]
            assert len(regions) >= 2 and buckets, step  # the head and the block, at least one bucket
            assert buckets[0] < regions[-1], step


def test_gradients_are_the_bucket_buffers(runs):
    # backward accumulates into the buffers that are all-reduced: no copy in, none out
    for name in ("overlap", "overlap-compile"):
        for events in runs[name]["events"]:
            views = [e[1] for e in events if e[0] == "grads_in_buckets"]
            assert len(views) == STEPS and all(views), (name, views)


def test_each_rank_orthogonalises_only_its_share(runs):
    per_rank = [[e for e in events if e[0] == "ns"] for events in runs["overlap"]["events"]]
    for k in range(STEPS):
        calls = [steps[k][2] for steps in per_rank]
        n_matrices = per_rank[0][k][3]
        assert sum(calls) == n_matrices and max(calls) - min(calls) <= 1, (calls, n_matrices)
    for events in runs["plain"]["events"]:
        assert all(e[2] == e[3] for e in events if e[0] == "ns")


# -----------------------------------------------------------------------------
# StepRows in one process: errors reach the loop, the thread always ends

class _Loader:
    def __init__(self, fail_at: int | None = None):
        self.pos, self.fail_at = 0, fail_at

    def next_step_rows(self, n):
        if self.pos == self.fail_at:
            raise ValueError("bad shard")
        self.pos += 1
        return torch.full((n, 3), self.pos), torch.ones(n, 3, dtype=torch.bool)

    def state_dict(self):
        return {"pos": self.pos}


def test_step_rows_prefetch_state_and_errors():
    loader = _Loader()
    feed = StepRows(loader, 2, steps=4, background=True)
    assert feed.state_dict() == {"pos": 0}
    rows, _ = feed.next()
    assert int(rows[0, 0]) == 1 and feed.state_dict() == {"pos": 1}
    deadline = time.time() + 10
    while loader.pos < 2 and time.time() < deadline:  # the thread reads step 2 meanwhile
        time.sleep(0.01)
    assert loader.pos == 2 and feed.state_dict() == {"pos": 1}  # the checkpoint position: rows handed out
    feed.close()
    assert not any(t.name == "nanochat-prefetch" and t.is_alive() for t in threading.enumerate())

    failing = StepRows(_Loader(fail_at=1), 2, steps=4, background=True)
    failing.next()
    with pytest.raises(ValueError, match="bad shard"):
        failing.next()
    failing.close()
    assert not any(t.name == "nanochat-prefetch" and t.is_alive() for t in threading.enumerate())


def test_probe_trial_step_of_several_ranks_holds_the_buffers_without_collectives():
    # the batch-size probe's ranks must never meet in a collective mid-trial: no process group here
    from nanochat.training.batch_size.trial import TrainStep, reserve_gradient_buckets, reserve_muon_gather
    from nanochat.gpt import GPT, GPTConfig
    from nanochat.optim import build_optimizers
    model = GPT(GPTConfig.from_depth(1, 320, 16))
    model.init_weights()
    optimizers = build_optimizers(model)
    assert not torch.distributed.is_initialized()
    TrainStep(16, 320, world_size=2)(model, optimizers, 2)
    n = sum(p.numel() for p in model.parameters())
    buffer = reserve_gradient_buckets(model)
    assert buffer.numel() == n  # GradientBuckets' buffers: one gradient's worth
    # the trial's gradients ARE that buffer, as training's are its buckets' (no second gradient's worth)
    model(torch.randint(0, 320, (2, 16)), torch.randint(0, 320, (2, 16))).backward()
    start, end = buffer.data_ptr(), buffer.data_ptr() + buffer.numel() * buffer.element_size()
    assert all(start <= p.grad.data_ptr() < end for p in model.parameters())
    assert buffer.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    assert reserve_muon_gather(optimizers).numel() == sum(p.numel() for p in model.transformer.h.parameters())

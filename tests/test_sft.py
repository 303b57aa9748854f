"""Chat SFT: one compilation for many batch lengths, the same loss padded or packed, the loss
normalised over the whole step, and the bench's JSON line."""
import csv
import json
import random
from pathlib import Path

import pytest
import torch

from nanochat.recipes.sft import SFTConfig, bench_ratios, load_conversations, render_examples
from nanochat.training.routes import CompileCounter
from nanochat.training.sft_loop import summed_loss, train
from nanochat.errors import ConfigError
from nanochat.gpt import CompiledGPT, GPTConfig, build_model
from nanochat.packing import MODES
from nanochat.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
WORDS = ("the a cat dog runs jumps over lazy quick brown fox model token data batch train loss step "
         "compile pack pad row mask attention what why how is are 1 2 3 4 5 6 7 8 9 0 + = ?").split()


def make_conversations(n, seed=0, max_words=300):
    """Small conversations with a long tail of lengths (log-normal word counts), 1-3 turns."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        turns = rng.randint(1, 3)
        budget = min(max_words, int(rng.lognormvariate(3.5, 0.9)) + 4)
        k = max(1, budget // (2 * turns))
        messages = []
        for _ in range(turns):
            messages.append({"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(k))})
            messages.append({"role": "assistant", "content": " ".join(rng.choice(WORDS) for _ in range(k))})
        out.append({"messages": messages})
    return out


@pytest.fixture(scope="module")
def tokenizer():
    texts = [m["content"] for c in make_conversations(200, seed=99) for m in c["messages"]]
    return Tokenizer.train(texts, 512)


def tiny_model(tokenizer, seq_len, seed=0):
    torch.manual_seed(seed)
    return build_model(GPTConfig.from_depth(2, tokenizer.get_vocab_size(), seq_len))


@pytest.mark.slow
def test_pad_and_pack_give_the_same_loss(tokenizer):
    """Sum of per-token losses over the same conversations, batched three ways. Packing several
    conversations per row must not let attention cross between them."""
    T = 128
    examples = render_examples(make_conversations(40, seed=1, max_words=200), tokenizer, T, "test")
    model = tiny_model(tokenizer, T)
    # Random output weights so the loss depends on context (a fresh model's blocks are the identity
    # and its lm_head is near zero).
    with torch.no_grad():
        for block in model.transformer.h:
            torch.nn.init.normal_(block.attn.c_proj.weight, std=0.3)
            torch.nn.init.normal_(block.mlp.c_proj.weight, std=0.3)
        torch.nn.init.normal_(model.lm_head.weight, std=0.2)
    pad_id = tokenizer.get_bos_token_id()
    results = {mode: summed_loss(model, examples, mode, 4, T, pad_id, pack_buffer=16) for mode in MODES}
    ref_total, ref_count = results["compile-pad"]
    assert ref_count > 100
    for mode, (total, count) in results.items():
        assert count == ref_count, mode
        assert total == pytest.approx(ref_total, rel=1e-5), mode
    # The same model compiled as training compiles it (by region, one fixed shape) agrees with eager on packed rows.
    compiled = CompiledGPT(model)
    total, count = summed_loss(compiled, examples, "compile-pack", 4, T, pad_id, pack_buffer=16)
    assert total == pytest.approx(ref_total, rel=1e-4)

    # Negative control: packed rows without the document mask see the previous conversations, and
    # the loss changes, so the equality above really checks the masking.
    class NoMask(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, idx, targets, doc_ids=None, loss_reduction="mean"):
            return self.m(idx, targets, loss_reduction=loss_reduction)

    leaky, _ = summed_loss(NoMask(model), examples, "compile-pack", 4, T, pad_id, pack_buffer=16)
    assert abs(leaky - ref_total) > 1e-3 * abs(ref_total), (leaky, ref_total)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["compile-pad", "compile-pack"])
def test_fifty_varying_batches_compile_once(tokenizer, mode):
    T, B = 128, 2
    conversations = make_conversations(50 * 12, seed=2, max_words=150)
    examples = render_examples(conversations, tokenizer, T, "test")
    model = tiny_model(tokenizer, T)
    cfg = SFTConfig(mode=mode, seq_len=T, device_batch_size=B, max_steps=50, save_checkpoint=False,
                    init_lr_frac=1.0, val_conversations=0)
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    row = train(cfg, model, tokenizer, examples, [], B, "config")
    assert row["steps"] == 50
    # one graph per compiled region (gpt.CompiledGPT: the blocks, the head, packed rows' mask), never a recompile
    regions = 3 if mode == "compile-pack" else 2
    assert row["num_compiles"] == regions
    assert row["compile"] is True
    # dynamo's own count agrees (torch._dynamo.reset() in train() does not clear these counters)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - before == regions
    # the batches really did vary: padded to their longest row, these 50 would have had many shapes
    from nanochat.packing import batch_for_mode, plan_batches
    lengths = [len(ids) - 1 for ids, _ in examples]
    plans = plan_batches(lengths, mode, B, T)[:50]
    widths = {batch_for_mode(examples, p, "eager-dynamic", T, 0).inputs.size(1) for p in plans}
    assert len(widths) >= 5
    assert 0 <= row["padding_fraction"] < 1
    assert row["real_tokens_per_s"] <= row["tokens_per_s"]
    assert row["supervised_tokens_per_s"] <= row["real_tokens_per_s"]
    assert row["final_loss"] < row["extra"]["first_loss"]  # it trained


def test_loss_is_normalised_over_the_whole_step(tokenizer, fp32_muon):
    """Two micro-batches of 2 and one of 4 over the same conversations take the same step: the loss is
    divided by the step's supervised tokens, not averaged per micro-batch (nanochat PR 400)."""
    T = 96
    examples = render_examples(make_conversations(8, seed=3, max_words=80), tokenizer, T, "test")
    # very different supervised counts per micro-batch make a per-micro-batch mean differ clearly
    examples = sorted(examples, key=lambda e: sum(e[1]))
    params = []
    for B, total in ((2, 2 * 2 * T), (4, 4 * T)):
        model = tiny_model(tokenizer, T)
        cfg = SFTConfig(mode="eager-dynamic", seq_len=T, device_batch_size=B, total_batch_size=total,
                        max_steps=1, save_checkpoint=False, init_lr_frac=1.0, seed=0)
        # the same order for both runs: no shuffle effect because both plan the same permutation of 8
        row = train(cfg, model, tokenizer, examples, [], B, "config")
        assert row["grad_accum_steps"] == total // (B * T)
        params.append(([p.detach().clone() for p in model.parameters()], row["final_loss"]))
    (p_a, loss_a), (p_b, loss_b) = params
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    for a, b in zip(p_a, p_b):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def test_batches_are_built_a_step_ahead_off_the_main_thread(tokenizer, monkeypatch):
    # overlap (the default): each step's micro-batches are made in the prefetch thread, not between
    # two steps on the main thread; overlap: false makes them there; both train the same steps exactly
    import threading
    from nanochat.training import sft_loop
    T, B = 96, 2
    examples = render_examples(make_conversations(40, seed=5, max_words=80), tokenizer, T, "test")
    made = []
    step_micro_batches = sft_loop._step_micro_batches
    monkeypatch.setattr(sft_loop, "_step_micro_batches", lambda plans, first, *a: made.append(
        (first, threading.current_thread() is threading.main_thread())) or step_micro_batches(plans, first, *a))
    results = {}
    for overlap in (True, False):
        made.clear()
        model = tiny_model(tokenizer, T)
        cfg = SFTConfig(mode="eager-pack", seq_len=T, device_batch_size=B,
                        total_batch_size=2 * B * T, max_steps=4, save_checkpoint=False, init_lr_frac=1.0,
                        overlap=overlap)
        row = train(cfg, model, tokenizer, examples, [], B, "config")
        assert row["steps"] == 4
        assert [first for first, _ in made] == [0, 2, 4, 6]  # each step once, in order
        assert all(not main for _, main in made) if overlap else all(main for _, main in made)
        assert not any(t.name == "nanochat-prefetch" and t.is_alive() for t in threading.enumerate())
        results[overlap] = (row["final_loss"], [p.detach().clone() for p in model.parameters()])
    assert results[True][0] == results[False][0]
    assert all(torch.equal(a, b) for a, b in zip(results[True][1], results[False][1]))


def test_compile_counter_counts_recompiles():
    counter = CompileCounter()
    f = torch.compile(lambda x: x * 2 + 1, dynamic=False, backend=counter)
    f(torch.ones(3))
    f(torch.ones(3))
    assert counter.count == 1
    f(torch.ones(5))  # a new shape: a recompilation
    assert counter.count == 2


def test_bad_input_raises_config_error(tmp_path):
    with pytest.raises(ConfigError, match="sft.mode"):
        SFTConfig(mode="compile-maybe").validate()
    with pytest.raises(ConfigError, match="data_path"):
        SFTConfig(data_path=str(tmp_path / "missing.jsonl")).validate()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\nnot json\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:2"):
        load_conversations(bad)


def test_load_conversations_jsonl_and_parquet(tmp_path):
    import pandas as pd
    convs = make_conversations(5, seed=4)
    jl = tmp_path / "c.jsonl"
    jl.write_text("".join(json.dumps(c) + "\n" for c in convs))
    pq = tmp_path / "c.parquet"
    pd.DataFrame({"messages": [c["messages"] for c in convs]}).to_parquet(pq)
    assert load_conversations(jl) == convs
    assert load_conversations(pq) == convs


def test_bench_ratios():
    """Three ratios attribute the gain: packing (both compiled), compiling (both packed), everything."""
    rows = [{"variant": "eager-dynamic", "real_tokens_per_s": 100.0},
            {"variant": "eager-pack", "real_tokens_per_s": 160.0},
            {"variant": "compile-pad", "real_tokens_per_s": 50.0},
            {"variant": "compile-pack", "real_tokens_per_s": 200.0}]
    assert bench_ratios(rows) == {"compile-pack/compile-pad": 4.0, "compile-pack/eager-pack": 1.25,
                                  "compile-pack/eager-dynamic": 2.0}
    assert bench_ratios(rows[:1] + rows[2:]) == {"compile-pack/compile-pad": 4.0, "compile-pack/eager-dynamic": 2.0}


def test_run_writes_a_loadable_checkpoint_and_resumes_after_preemption(tmp_path):
    from nanochat.recipes.sft import run
    from nanochat.checkpoint import load_model
    cfg = SFTConfig(out_dir=str(tmp_path / "sft"), mode="eager-dynamic", num_conversations=120,
                    val_conversations=8, seq_len=128, device_batch_size=4, depth=2, vocab_size=512,
                    max_steps=6, init_lr_frac=1.0, device_type="cpu")
    calls = []

    def stop_after_two():
        calls.append(1)
        return len(calls) >= 2

    row = run(cfg, should_stop=stop_after_two)
    assert row["state"] == "PREEMPTED" and row["steps"] == 2
    assert row["variant"] == "eager-dynamic" and row["batch_size_source"] == "config"
    row = run(cfg)
    assert row["state"] == "COMPLETED"
    assert row["extra"]["resumed_from_step"] == 2 and row["steps"] == 4
    with open(tmp_path / "sft" / "metrics.csv") as f:
        last = list(csv.DictReader(f))[-1]
    assert (last["step"], last["num_steps"]) == ("6", "6")   # the total the live progress shows
    model, tok, meta = load_model(tmp_path / "sft" / "checkpoints", "cpu")
    assert meta["step"] == 6 and meta["stage"] == "sft" and meta["sft_mode"] == "eager-dynamic"
    assert model.config.n_layer == 2 and tok.get_vocab_size() == 512
    ids = tok.render_for_completion({"messages": [{"role": "user", "content": "hello"}]})
    assert model(torch.tensor([ids])).shape == (1, len(ids), 512)


def _two_rank_worker(rank, world, port, tok_dir, examples, out_path):
    import os
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        tok = Tokenizer.load(tok_dir)
        model = tiny_model(tok, 96)
        cfg = SFTConfig(mode="eager-dynamic", seq_len=96, device_batch_size=2, total_batch_size=2 * 96 * world,
                        max_steps=1, save_checkpoint=False, init_lr_frac=1.0)
        row = train(cfg, model, tok, examples, [], 2, "config")
        if rank == 0:
            torch.save({"params": [p.detach() for p in model.parameters()], "loss": row["final_loss"],
                        "accum": row["grad_accum_steps"]}, out_path)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_take_the_same_step_as_one_rank_accumulating(tokenizer, tmp_path):
    """Two gloo ranks with one micro-batch each = one rank with two micro-batches: the supervised
    count is summed over ranks before the division, and gradients are averaged (x world_size)."""
    import socket
    import torch.multiprocessing as mp
    T = 96
    examples = sorted(render_examples(make_conversations(8, seed=5, max_words=80), tokenizer, T, "test"),
                      key=lambda e: sum(e[1]))
    tokenizer.save(tmp_path / "tok")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_two_rank_worker, args=(2, port, str(tmp_path / "tok"), examples, str(tmp_path / "ddp.pt")), nprocs=2)
    ddp = torch.load(tmp_path / "ddp.pt")
    assert ddp["accum"] == 1
    model = tiny_model(tokenizer, T)
    cfg = SFTConfig(mode="eager-dynamic", seq_len=T, device_batch_size=2, total_batch_size=2 * 2 * T,
                    max_steps=1, save_checkpoint=False, init_lr_frac=1.0)
    row = train(cfg, model, tokenizer, examples, [], 2, "config")
    assert row["grad_accum_steps"] == 2
    assert ddp["loss"] == pytest.approx(row["final_loss"], rel=1e-5)
    for a, b in zip(ddp["params"], model.parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=1e-3, atol=1e-4)


@pytest.mark.slow
def test_bench_sft_prints_four_modes_and_three_ratios_as_its_last_json_line(capsys):
    from jobs.cli import main
    rc = main(["bench", "sft", "--json", "--depth", "2", "--vocab-size", "512", "--seq-len", "128", "--batch-size", "2",
                         "--steps", "3", "--conversations", "150"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(out["modes"]) == set(MODES)
    for mode, m in out["modes"].items():
        assert m["real_tokens_per_s"] > 0 and m["timed_steps"] == 2
        assert m["supervised_tokens_per_s"] <= m["real_tokens_per_s"] <= m["tokens_per_s"]
        assert m["num_compiles"] == {"compile-pack": 3, "compile-pad": 2}.get(mode, 0)  # one per compiled region
    modes = out["modes"]
    assert modes["compile-pack"]["padding_fraction"] < modes["compile-pad"]["padding_fraction"]
    # eager-pack runs compile-pack's rows: the same padding and the same loss, without a compilation
    assert modes["eager-pack"]["padding_fraction"] == modes["compile-pack"]["padding_fraction"]
    assert modes["eager-pack"]["final_loss"] == pytest.approx(modes["compile-pack"]["final_loss"], rel=1e-3)
    for name, a, b in (("compile-pack/compile-pad", "compile-pack", "compile-pad"),
                       ("compile-pack/eager-pack", "compile-pack", "eager-pack"),
                       ("compile-pack/eager-dynamic", "compile-pack", "eager-dynamic")):
        assert out["ratios"][name] == pytest.approx(modes[a]["real_tokens_per_s"] / modes[b]["real_tokens_per_s"])
    assert main(["bench", "sft", "--modes", "compile-sometimes"]) == 2

"""Batching for SFT: best-fit packing, padding modes, and the tensors each mode builds."""
import random

import pytest
import torch

from nanochat.packing import (MODES, PACKED_MODES, PAD_DOC_ID, batch_for_mode, best_fit_decreasing, build_batch,
                              plan_batches, truncate)


def make_examples(n, seed=0, max_len=200):
    """Random (ids, mask) pairs with a long tail of lengths, masks alternating in spans."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        L = min(max_len, 2 + int(rng.paretovariate(1.2) * 10))
        ids = [rng.randrange(1, 500) for _ in range(L)]
        mask = [0] * L
        start = rng.randrange(1, L)
        for j in range(start, L):
            mask[j] = 1
        out.append((ids, mask))
    return out


def positions(ex):
    return len(ex[0]) - 1


def test_best_fit_decreasing_fills_tightest_bin_and_respects_capacity():
    lengths = [5, 4, 3, 3, 2, 1]
    bins, leftover = best_fit_decreasing(lengths, capacity=6, num_bins=3)
    for b in bins:
        assert sum(lengths[i] for i in b) <= 6
    placed = [i for b in bins for i in b]
    assert sorted(placed + leftover) == list(range(6))
    # 18 units in 3 bins of 6: best fit places them all (5+1, 4+2, 3+3).
    assert leftover == []
    assert sorted(sorted(lengths[i] for i in b) for b in bins) == [[1, 5], [2, 4], [3, 3]]


def test_best_fit_decreasing_leaves_what_does_not_fit():
    bins, leftover = best_fit_decreasing([4, 4, 4], capacity=5, num_bins=2)
    assert len(bins) == 2 and len(leftover) == 1
    with pytest.raises(ValueError):
        best_fit_decreasing([7], capacity=5, num_bins=1)


@pytest.mark.parametrize("mode", MODES)
def test_every_conversation_appears_exactly_once(mode):
    T, B = 128, 4
    examples = [truncate(e, T) for e in make_examples(300, seed=1)]
    plans = plan_batches([positions(e) for e in examples], mode, B, T, pack_buffer=64)
    seen = [i for plan in plans for row in plan for i in row]
    assert sorted(seen) == list(range(len(examples)))
    for plan in plans:
        if mode != "eager-dynamic":
            assert len(plan) == B  # fixed shape, also for the last batch
        for row in plan:
            assert sum(positions(examples[i]) for i in row) <= T
            if mode not in PACKED_MODES:
                assert len(row) <= 1


def test_packing_wastes_far_less_than_padding():
    T, B = 256, 4
    examples = [truncate(e, T) for e in make_examples(400, seed=2, max_len=T + 1)]
    lengths = [positions(e) for e in examples]
    pad = plan_batches(lengths, "compile-pad", B, T)
    pack = plan_batches(lengths, "compile-pack", B, T, pack_buffer=128)
    real = sum(lengths)
    fill_pad = real / (len(pad) * B * T)
    fill_pack = real / (len(pack) * B * T)
    assert fill_pack > 0.9
    assert fill_pack > 2 * fill_pad


def test_build_batch_targets_masks_and_doc_ids():
    ex_a = ([10, 11, 12, 13], [0, 0, 1, 1])  # 3 positions, targets 11 12 13, supervised 12 13
    ex_b = ([20, 21, 22], [0, 1, 0])          # 2 positions, targets 21 22, supervised 21
    b = build_batch([ex_a, ex_b], [[0, 1], []], seq_len=8, pad_id=0, with_doc_ids=True)
    assert b.inputs.shape == (2, 8)
    assert b.inputs[0].tolist() == [10, 11, 12, 20, 21, 0, 0, 0]
    assert b.targets[0].tolist() == [-1, 12, 13, 21, -1, -1, -1, -1]
    assert b.doc_ids[0].tolist() == [0, 0, 0, 1, 1, PAD_DOC_ID, PAD_DOC_ID, PAD_DOC_ID]
    assert b.targets[1].tolist() == [-1] * 8
    assert (b.num_positions, b.num_real, b.num_supervised, b.num_conversations) == (16, 5, 3, 2)
    assert b.num_supervised == int((b.targets != -1).sum())


def test_modes_supervise_the_same_tokens():
    T, B = 64, 3
    examples = [truncate(e, T) for e in make_examples(50, seed=3, max_len=T + 10)]
    lengths = [positions(e) for e in examples]
    totals = {}
    for mode in MODES:
        sup = real = 0
        for plan in plan_batches(lengths, mode, B, T, pack_buffer=16):
            batch = batch_for_mode(examples, plan, mode, T, pad_id=0)
            if mode == "eager-dynamic":
                assert batch.inputs.size(1) == max(sum(lengths[i] for i in row) for row in plan)
            else:
                assert batch.inputs.shape == (B, T)
            assert (batch.doc_ids is not None) == (mode in PACKED_MODES)
            sup += batch.num_supervised
            real += batch.num_real
        totals[mode] = (sup, real)
    assert len(set(totals.values())) == 1
    assert totals["compile-pad"][1] == sum(lengths)


def test_bad_inputs_raise():
    with pytest.raises(ValueError):
        plan_batches([3, 4], "compile-sometimes", 2, 8)
    with pytest.raises(ValueError):
        plan_batches([3, 40], "compile-pack", 2, 8)


# -----------------------------------------------------------------------------
# Attention for packed rows: FlexAttention's block mask (CUDA) and SDPA's dense mask (CPU) agree

def _packed_batch_and_model(n_head=4, n_kv_head=4, device="cpu", seed=0):
    from nanochat.gpt import GPT, GPTConfig
    torch.manual_seed(seed)
    config = GPTConfig(sequence_len=160, vocab_size=97, n_layer=2, n_head=n_head, n_kv_head=n_kv_head, n_embd=128)
    model = GPT(config).to(device).init_weights()
    with torch.no_grad():  # random output projections: a fresh model's blocks are the identity
        for block in model.transformer.h:
            torch.nn.init.normal_(block.attn.c_proj.weight, std=0.3)
            torch.nn.init.normal_(block.mlp.c_proj.weight, std=0.3)
        torch.nn.init.normal_(model.lm_head.weight, std=0.2)
    g = torch.Generator().manual_seed(seed)
    lengths = [int(n) for n in torch.randint(5, 70, (14,), generator=g)]
    examples = [(torch.randint(0, 97, (n,), generator=g).tolist(), [0] * (n // 2) + [1] * (n - n // 2)) for n in lengths]
    plan = plan_batches([n - 1 for n in lengths], "compile-pack", 3, 160, pack_buffer=16)[0]
    batch = build_batch(examples, plan, 160, 0, with_doc_ids=True).to(torch.device(device))
    assert batch.doc_ids.max() >= 2 and (batch.doc_ids == PAD_DOC_ID).any()  # several documents and padding per row
    return model, batch


def _loss(model, batch, route):
    model.doc_attention = route
    return model(batch.inputs, batch.targets, doc_ids=batch.doc_ids, loss_reduction="sum")


@pytest.mark.parametrize("n_kv_head", [4, 2])
def test_flex_block_mask_and_sdpa_dense_mask_give_the_same_loss(n_kv_head):
    """Forward on CPU (FlexAttention has no backward there), grouped-query attention included."""
    from nanochat.gpt import doc_attention_route
    model, batch = _packed_batch_and_model(n_kv_head=n_kv_head)
    with torch.no_grad():
        sdpa, flex = _loss(model, batch, "sdpa"), _loss(model, batch, "flex")
        causal_only = model(batch.inputs, batch.targets, loss_reduction="sum")
    assert float(flex) == pytest.approx(float(sdpa), rel=1e-5)
    # negative control: attention across documents changes the loss, so the equality checks the mask
    assert abs(float(causal_only) - float(sdpa)) > 1e-3 * abs(float(sdpa))
    assert doc_attention_route("auto", torch.device("cpu")) == "sdpa"
    assert doc_attention_route("auto", torch.device("cuda")) == "flex"
    with pytest.raises(ValueError, match="doc attention"):
        doc_attention_route("dense", torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flex_on_cuda_matches_sdpa_forward_and_backward_compiled():
    """On CUDA packed rows take FlexAttention by default; loss and gradients equal SDPA's dense mask,
    eager (compiled flex kernel) and with the whole model compiled."""
    model, batch = _packed_batch_and_model(n_kv_head=2, device="cuda")
    assert model.doc_attention == "auto"

    def loss_and_grads(m, route):
        model.doc_attention = route
        model.zero_grad(set_to_none=True)
        loss = m(batch.inputs, batch.targets, doc_ids=batch.doc_ids, loss_reduction="sum")
        loss.backward()
        return float(loss), [p.grad.clone() for p in model.parameters()]

    ref_loss, ref_grads = loss_and_grads(model, "sdpa")
    for m in (model, torch.compile(model, dynamic=False)):
        loss, grads = loss_and_grads(m, "auto")
        assert loss == pytest.approx(ref_loss, rel=1e-4)
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compile_pack_sft_on_cuda_takes_flex_attention():
    """The SFT stage's packed, compiled path on CUDA: FlexAttention inside the compiled model, the
    row says so, and it trains."""
    from nanochat.recipes.sft import SFTConfig, render_examples
    from nanochat.training.sft_loop import train
    from nanochat.gpt import GPTConfig, build_model
    from nanochat.synthetic import generate_conversations
    from nanochat.tokenizer import Tokenizer
    T = 256
    convs = generate_conversations(200, seed=0, max_tokens=T)
    tok = Tokenizer.byte_level()          # the lent GPU machine has no rustbpe to train one
    torch.manual_seed(0)
    model = build_model(GPTConfig.from_depth(2, tok.get_vocab_size(), T), torch.device("cuda"))
    cfg = SFTConfig(mode="compile-pack", seq_len=T, device_batch_size=4, max_steps=6, save_checkpoint=False,
                    val_conversations=0, init_lr_frac=1.0)
    row = train(cfg, model, tok, render_examples(convs, tok, T, "test"), [], 4, "config")
    print({k: row[k] for k in ("num_compiles", "real_tokens_per_s", "padding_fraction", "final_loss")})
    assert row["extra"]["attention"] == "flex-document-mask"
    assert row["compile"] is True and row["num_compiles"] >= 1
    assert row["final_loss"] < row["extra"]["first_loss"]

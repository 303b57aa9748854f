"""
CUDA only (marked `gpu`, skipped without CUDA; run by `python -m jobs gpu-check` where a GPU is lent):
the GPU side of issue 22's performance items whose logic the CPU tests cover. One dtype from the
embedding to the logits under bf16 autocast (FlexAttention gets bf16 q, k and v), and the CUDA-graph
decode attending to the filled length buckets only, with the eager cache's greedy tokens.
Small shapes only; nothing here imports submitit or rustbpe (the lent machine has neither).
"""
import pytest
import torch

import nanochat.gpt as gpt
from nanochat.gpt import GPTConfig, build_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def cuda_model(n_layer=2, vocab=512, seq=256):
    torch.manual_seed(0)
    return build_model(GPTConfig(sequence_len=seq, vocab_size=vocab, n_layer=n_layer, n_head=4, n_kv_head=2,
                                 n_embd=128), device="cuda")


def test_flex_attention_gets_one_dtype_under_cuda_autocast(monkeypatch):
    # torch 2.12+ autocast runs rms_norm in fp32: the QK norm must not hand flex fp32 q/k and a bf16 v
    model = cuda_model()
    model.doc_attention = "flex"
    seen = []
    flex = gpt.flex_attention

    def spy(q, k, v, *a, **kw):
        seen.append((q.dtype, k.dtype, v.dtype))
        return flex(q, k, v, *a, **kw)

    monkeypatch.setattr(gpt, "flex_attention", spy)
    x = torch.randint(0, 512, (2, 256), device="cuda")
    doc_ids = (torch.arange(256, device="cuda") // 100).expand(2, -1)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(x, x, doc_ids=doc_ids)
    loss.backward()
    assert seen and all(d == torch.bfloat16 for s in seen for d in s), seen
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("packed", [False, True])
def test_compiled_by_region_matches_eager_under_bf16_autocast(packed):
    # inductor's kernels (flex's included on packed rows) for the regions training compiles
    model = cuda_model()
    x = torch.randint(0, 512, (4, 256), device="cuda")
    doc_ids = (torch.arange(256, device="cuda") // 100).expand(4, -1) if packed else None
    with torch.autocast("cuda", dtype=torch.bfloat16):
        eager = model(x, x, doc_ids=doc_ids)
    eager.backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    compiled = gpt.CompiledGPT(model)
    for _ in range(2):  # the second call runs the compiled graphs without compiling again
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = compiled(x, x, doc_ids=doc_ids)
        loss.backward()
    assert loss.item() == pytest.approx(eager.item(), rel=2e-2)
    for p, g in zip(model.parameters(), eager_grads):  # bf16 both: compare as a whole, not element by element
        assert torch.isfinite(p.grad).all()
        assert (p.grad - g).norm() <= 5e-2 * g.norm() + 1e-6, p.shape


def test_captured_decode_reads_only_the_filled_buckets_and_matches_eager(monkeypatch):
    import torch.nn.functional as F
    from nanochat.engine import DecodeStep, Engine, check_decode, full_fp32_matmuls
    from nanochat.recipes.inference_bench import randomize_weights
    monkeypatch.setattr(DecodeStep, "ATTEND_BUCKET", 16)
    model = cuda_model(n_layer=3)
    randomize_weights(model, 0)
    model.eval()
    prompt = torch.randint(0, 512, (20,), generator=torch.Generator().manual_seed(1)).tolist()
    with full_fp32_matmuls():
        eager = [c for c, _ in Engine(model, decode="eager").generate(prompt, num_samples=3, max_tokens=40,
                                                                      temperature=0.0)]
        recorded = []  # key lengths the captured steps were recorded with (Python runs only at capture)
        sdpa = F.scaled_dot_product_attention
        monkeypatch.setattr(F, "scaled_dot_product_attention",
                            lambda q, k, v, *a, **kw: recorded.append(k.size(2)) or sdpa(q, k, v, *a, **kw))
        engine = Engine(model, decode="graph")
        for _ in range(2):  # the second generation replays the first one's graphs
            graph = [c for c, _ in engine.generate(prompt, num_samples=3, max_tokens=40, temperature=0.0)]
            assert graph == eager
        (step,) = engine._steps.values()
        # filled lengths 21..59 of a cache of 256 positions (Engine.GRAPH_BUCKET): buckets 32, 48 and 64
        assert step.cache.max_len == 256 and sorted(step.graphs) == [32, 48, 64]
        assert set(recorded) - {20} == {32, 48, 64}  # (20: the prefill, eager)
        monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)
        result = check_decode(model, prompt, 40, num_samples=2, decode="graph")
    assert result["ok"], result["max_logit_diff"]


def test_sft_batches_reach_the_gpu_from_pinned_memory(monkeypatch):
    # built a step ahead in the prefetch thread and pinned there, so the copy does not block the host
    from nanochat.recipes.sft import SFTConfig, render_examples, synthetic_conversations
    from nanochat.training.sft_loop import train
    from nanochat.packing import Batch
    from nanochat.tokenizer import Tokenizer
    tokenizer = Tokenizer.byte_level()  # no rustbpe on the lent GPU machine
    T, B = 128, 2
    examples = render_examples(synthetic_conversations(60, 0, T), tokenizer, T, "synthetic")
    pinned = []
    to = Batch.to
    monkeypatch.setattr(Batch, "to", lambda self, device: pinned.append(self.inputs.is_pinned()) or to(self, device))
    model = build_model(GPTConfig.from_depth(2, tokenizer.get_vocab_size(), T), device="cuda")
    cfg = SFTConfig(mode="eager-pack", seq_len=T, device_batch_size=B, total_batch_size=2 * B * T, max_steps=3,
                    save_checkpoint=False, device_type="cuda")
    row = train(cfg, model, tokenizer, examples, [], B, "config")
    assert row["steps"] == 3 and len(pinned) == 6 and all(pinned)

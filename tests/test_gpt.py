"""The model's numerics on a CPU: activations carry one dtype from the embedding to the logits."""
import pytest
import torch
import torch.nn.functional as F

import nanochat.gpt as gpt
from nanochat.gpt import GPT, GPTConfig


@pytest.fixture
def rms_norm_fp32_under_cpu_autocast():
    """CPU autocast with the rms_norm policy CUDA autocast has from torch 2.12 (run it in fp32):
    a kernel for aten::rms_norm at the AutocastCPU dispatch key, where torch registers its own
    policies. This CPU's torch keeps rms_norm in bf16 under autocast, so without it the case
    (q/k fp32 next to a bf16 v at the attention) would only show on a GPU."""
    lib = torch.library.Library("aten", "IMPL")
    autocast_cpu = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)

    def rms_norm_fp32(x, normalized_shape, weight=None, eps=None):
        with torch._C._ExcludeDispatchKeyGuard(autocast_cpu):
            return torch.ops.aten.rms_norm(x.float(), normalized_shape,
                                           None if weight is None else weight.float(), eps)

    lib.impl("rms_norm", rms_norm_fp32, "AutocastCPU")
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert F.rms_norm(x, (8,)).dtype == torch.float32  # the policy is in force
    yield
    lib._destroy()


def _small_model():
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_depth(2, 256, 64))
    model.init_weights()
    return model


@pytest.mark.parametrize("route", ["sdpa", "flex", "causal"])
def test_bf16_autocast_keeps_every_activation_bf16(route, rms_norm_fp32_under_cpu_autocast, monkeypatch):
    model = _small_model()
    model.doc_attention = "flex" if route == "flex" else "sdpa"
    seen = []  # (what, dtypes) at each attention call and each block's input
    sdpa, flex = F.scaled_dot_product_attention, gpt.flex_attention

    def spy_sdpa(q, k, v, *a, **kw):
        seen.append(("sdpa", q.dtype, k.dtype, v.dtype))
        return sdpa(q, k, v, *a, **kw)

    def spy_flex(q, k, v, *a, **kw):
        seen.append(("flex", q.dtype, k.dtype, v.dtype))
        return flex(q, k, v, *a, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy_sdpa)
    monkeypatch.setattr(gpt, "flex_attention", spy_flex)
    for block in model.transformer.h:
        block.register_forward_pre_hook(lambda m, args: seen.append(("residual", args[0].dtype)))
    x = torch.randint(0, 256, (2, 64))
    doc_ids = None if route == "causal" else (torch.arange(64) // 24).expand(2, -1)
    with torch.no_grad():
        reference = model(x, x, doc_ids=doc_ids)
    seen.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if route == "flex":  # FlexAttention has no backward on a CPU
            with torch.no_grad():
                loss = model(x, x, doc_ids=doc_ids)
        else:
            loss = model(x, x, doc_ids=doc_ids)
            loss.backward()
    attention = [s for s in seen if s[0] != "residual"]
    assert len(attention) == 2 and {s[0] for s in attention} == {"flex" if route == "flex" else "sdpa"}
    assert all(d == torch.bfloat16 for s in seen for d in s[1:]), seen
    assert loss.dtype == torch.float32 and abs(loss.item() - reference.item()) < 0.02 * reference.item()


@pytest.mark.parametrize("packed", [False, True])
def test_compiled_by_region_equals_eager_and_splits_backward_per_block(packed):
    # aot_eager: dynamo and AOTAutograd cut the same regions and autograd graph inductor compiles
    model = _small_model()
    x = torch.randint(0, 256, (2, 64))
    doc_ids = (torch.arange(64) // 24).expand(2, -1) if packed else None
    eager = model(x, x, doc_ids=doc_ids)
    eager.backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    compiled = gpt.CompiledGPT(model, backend="aot_eager")
    loss = compiled(x, x, doc_ids=doc_ids)
    regions, todo, seen = 0, [loss.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is not None and node not in seen:
            seen.add(node)
            regions += "CompiledFunction" in node.name()
            todo.extend(n for n, _ in node.next_functions)
    assert regions == 1 + model.config.n_layer  # the head and each block: backward is not one opaque node
    loss.backward()
    assert loss.item() == pytest.approx(eager.item(), rel=1e-6)
    for p, g in zip(model.parameters(), eager_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="kv_cache"):
        model(x, compiled=compiled, kv_cache=object())

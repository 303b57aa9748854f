"""
The fast CPU decode (issue 14): int8 weights with bf16 activations are chosen where the CPU has fast
bf16 (AMX or AVX512-BF16), fp32 elsewhere; the int8 model decodes what fp32 decodes on nearly every
position; fp32 stays exact; and the benchmark reports the fast path and the multi-sample ratio next
to the fp32 baseline. Speed itself is measured by `python -m jobs bench inference`, not here.
"""
import pytest
import torch

import nanochat.cpu_features
from nanochat.engine import Engine, Int8Linear, decode_precision_route, prepare_for_inference
from nanochat.gpt import GPTConfig, build_model
from nanochat.recipes.inference_bench import InferenceBenchConfig, greedy_agreement, randomize_weights, run as run_bench


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(seed=0):
    model = build_model(GPTConfig(sequence_len=128, vocab_size=512, n_layer=2, n_head=4, n_kv_head=2, n_embd=64))
    randomize_weights(model, seed)
    return model.eval()


def prompts(n, length=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 500, (length,), generator=g).tolist() for _ in range(n)]


@pytest.fixture
def fast_bf16(monkeypatch):
    """Set what the CPU is said to have (the decision reads nanochat.cpu_features at call time)."""
    def set_to(value: bool):
        monkeypatch.setattr(nanochat.cpu_features, "cpu_has_fast_bf16", lambda: value)
    return set_to


def test_int8_on_cuda_is_refused_before_any_work():
    # _weight_int8pack_mm has no CUDA kernel: a ConfigError (exit 2) from the route and the config check
    from nanochat.errors import ConfigError
    from nanochat.recipes.inference_bench import InferenceBenchConfig
    with pytest.raises(ConfigError, match="no CUDA kernel"):
        decode_precision_route("int8", "cuda")
    with pytest.raises(ConfigError, match="precision: int8 is for CPUs"):
        InferenceBenchConfig(device_type="cuda", precision="int8").validate()
    InferenceBenchConfig(device_type="cpu", precision="int8").validate()


def test_auto_precision_follows_the_hardware(fast_bf16):
    fast_bf16(True)
    assert decode_precision_route("auto", "cpu") == "int8"
    fast_bf16(False)
    assert decode_precision_route("auto", "cpu") == "fp32"    # emulated bf16 would be slower than fp32
    assert decode_precision_route("auto", "cuda") == "bf16"
    assert decode_precision_route("fp32", "cpu") == "fp32" and decode_precision_route("int8", "cpu") == "int8"
    with pytest.raises(ValueError, match="decode precision 'fp16'"):
        decode_precision_route("fp16", "cpu")


def test_this_machines_choice_is_its_cpu_flags():
    # the real detection, not a stub: int8 exactly where torch sees AMX or AVX512-BF16
    has = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert nanochat.cpu_features.cpu_has_fast_bf16() == has
    assert decode_precision_route("auto", "cpu") == ("int8" if has else "fp32")


@torch.inference_mode()
def test_int8_linear_is_close_to_the_linear():
    lin = torch.nn.Linear(64, 96, bias=False)
    q = Int8Linear(lin)
    assert q.weight.dtype == torch.int8 and q.scale.shape == (96,)
    x = torch.randn(3, 5, 64)
    ref, out = lin(x), q(x).float()
    assert out.shape == ref.shape
    assert (out - ref).norm() / ref.norm() < 0.02     # int8 per row + bf16 activations: well under 2%


@torch.inference_mode()
def test_prepare_for_inference_int8_replaces_every_linear_and_agrees_with_fp32(fast_bf16):
    fast_bf16(True)
    reference, model = tiny_model(), tiny_model()
    assert prepare_for_inference(model) == "int8"
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    assert model.transformer.wte.weight.dtype == torch.bfloat16
    result = greedy_agreement(reference, model, prompts(4), 24)
    assert result["greedy_agreement"] >= 0.95 and result["quality_prompts"] == 4
    # the int8 model samples independent first tokens and stays within the cache's contract
    first = next(Engine(model, decode="eager").generate(prompts(1)[0], num_samples=16, max_tokens=2, temperature=1.0))[0]
    assert len(set(first)) > 1


@torch.inference_mode()
def test_fp32_stays_exact(fast_bf16):
    fast_bf16(False)
    reference, model = tiny_model(), tiny_model()
    assert prepare_for_inference(model) == "fp32"
    ids = torch.tensor([prompts(1)[0]])
    assert torch.equal(model(ids), reference(ids))


def test_bench_reports_the_fast_path_and_multi_sample_ratio(fast_bf16):
    fast_bf16(True)
    cfg = InferenceBenchConfig(depth=2, vocab_size=512, prompt_len=8, new_tokens=6, quality_prompts=2, multi_samples=4)
    by = {r["variant"]: r for r in run_bench(cfg)}
    fast = by["kv-fast"]
    assert fast["state"] == "COMPLETED" and fast["precision"] == "int8"
    assert fast["speedup_vs_eager"] > 0 and fast["greedy_agreement"] >= 0.9 and fast["quality_prompts"] == 2
    multi = by["kv-eager-x4"]
    assert multi["state"] == "COMPLETED" and multi["rows_decoded"] == 4 and multi["speedup_vs_1_sample"] > 0
    assert multi["greedy_identical"] is True          # greedy rows all decode what 1 sample does


def test_bench_skips_the_fast_path_without_fast_bf16(fast_bf16):
    fast_bf16(False)
    cfg = InferenceBenchConfig(depth=2, vocab_size=512, prompt_len=8, new_tokens=6, multi_samples=1)
    by = {r["variant"]: r for r in run_bench(cfg)}
    assert by["kv-fast"]["state"] == "SKIPPED" and by["kv-fast"]["precision"] == "fp32"
    assert not any(v.startswith("kv-eager-x") for v in by)

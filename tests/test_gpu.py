"""
CUDA only (marked `gpu`, skipped without CUDA; `python -m jobs gpu-check` runs them on a lent GPU):
the device facts of this GPU, NVML, the decode check of every cached variant including the CUDA
graph, the inference bench's bf16 timing after its fp32 check, a compiled training step against
eager, a real CUDA out-of-memory recognised as one, and gpu_util_mean in a stage's row.
Small shapes only. Nothing here imports submitit or rustbpe (the lent machine has neither).
"""
import json
import math

import pytest
import torch

from nanochat.distributed import local_cuda_index
from nanochat.peaks import DEVICE_PEAKS, peak_bandwidth, peak_flops
from nanochat.engine import Engine, KVCache, check_decode, full_fp32_matmuls
from nanochat.gpt import GPTConfig, build_model
from nanochat.recipes.inference_bench import InferenceBenchConfig, randomize_weights, run as run_bench

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def tiny_cuda_model(n_layer=2, vocab=512, seq=128):
    model = build_model(GPTConfig(sequence_len=seq, vocab_size=vocab, n_layer=n_layer, n_head=4, n_kv_head=2,
                                  n_embd=64), device="cuda")
    randomize_weights(model, 0)
    return model.eval()


def prompt(n=12, vocab=512):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(1)).tolist()


def test_this_gpu_is_in_the_peak_table_if_it_is_a_datacenter_part():
    name = torch.cuda.get_device_name(0)
    if name.startswith(("NVIDIA H100", "NVIDIA H200", "NVIDIA A100")):
        assert name in DEVICE_PEAKS, f"{name!r}: add it to nanochat.peaks.DEVICE_PEAKS (exact name)"
        assert peak_flops(name) > 100e12 and peak_bandwidth(name) > 1e12


def test_this_gpu_has_peaks_from_the_table_or_its_properties():
    from nanochat.peaks import device_peaks
    peaks = device_peaks(torch.device("cuda", 0))
    major, minor = torch.cuda.get_device_capability(0)
    if (major, minor) >= (8, 0):
        assert peaks["peak_flops"] and peaks["peak_flops_source"] in ("table", "cuda_properties"), peaks
        assert peaks["peak_bandwidth"] and peaks["peak_bandwidth_source"] in ("table", "cuda_properties"), peaks


def test_local_rank_maps_to_a_visible_device():
    n = torch.cuda.device_count()
    for local_rank in range(2 * n + 3):
        index = local_cuda_index(local_rank, n)
        torch.zeros(1, device=torch.device("cuda", index))     # exists


def test_nvml_reads_this_gpus_utilisation():
    from nanochat.gpu_monitor import nvml_reader, start_gpu_sampler
    read, why = nvml_reader(torch.cuda.current_device())
    assert read is not None, why
    assert 0 <= read() <= 100
    sampler, why = start_gpu_sampler("cuda", torch.cuda.current_device(), interval_s=0.05)
    assert sampler is not None, why
    a = torch.randn(4096, 4096, device="cuda")
    for _ in range(200):
        a = torch.tanh(a @ a)
    torch.cuda.synchronize()
    mean = sampler.stop()
    assert mean is not None and 0 < mean <= 100 and len(sampler.samples) >= 2


@pytest.mark.parametrize("decode", ["eager", "static", "graph"])
def test_decode_check_passes_every_cached_variant_in_fp32(decode):
    model = tiny_cuda_model()
    with full_fp32_matmuls():
        result = check_decode(model, prompt(), 24, num_samples=3, decode=decode)
    assert result["ok"], result["max_logit_diff"]


def test_decode_check_catches_a_position_blind_cuda_graph(monkeypatch):
    rotary = KVCache.rotary

    def blind(self, cos, sin, T):
        if not self.static:
            return rotary(self, cos, sin, T)
        idx = self._arange[:T][None, :].expand(self.batch_size, T)
        return cos[0, idx], sin[0, idx]
    monkeypatch.setattr(KVCache, "rotary", blind)
    with full_fp32_matmuls():
        result = check_decode(tiny_cuda_model(), prompt(), 16, num_samples=2, decode="graph")
    assert not result["ok"] and result["first_bad_step"] == 1


def test_full_fp32_matmuls_turns_tf32_off_and_restores_it():
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")           # what compute_init's allow_tf32 amounts to
    try:
        with full_fp32_matmuls():
            assert not torch.backends.cuda.matmul.allow_tf32
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)


def test_inference_bench_times_bf16_after_the_fp32_check(tmp_path):
    rows = run_bench(InferenceBenchConfig(device_type="cuda", depth=2, vocab_size=512, prompt_len=8, new_tokens=8,
                                          num_samples=2, diversity_samples=8, out_dir=str(tmp_path)))
    by = {r["variant"]: r for r in rows}
    assert set(by) == {"naive", "kv-eager", "kv-graph", "kv-fast"}    # no -xN: already 2 rows
    # kv-fast's precision on CUDA (bf16) is the timed dtype: nothing more to time
    assert by["kv-fast"]["state"] == "SKIPPED" and by["kv-fast"]["precision"] == "bf16"
    for variant in ("kv-eager", "kv-graph"):
        r = by[variant]
        assert r["state"] == "COMPLETED" and r["decode_check"] == "pass", r
        assert r["weights_dtype"] == "bfloat16" and r["tokens_per_s"] > 0 and r["speedup_vs_naive"] > 0
    assert json.loads((tmp_path / "inference_bench.json").read_text())["summary"]["decode_check"] is True
    # bf16 sampling: every sample still draws its own first token
    model = tiny_cuda_model().to(torch.bfloat16)
    first = next(Engine(model).generate(prompt(), num_samples=16, max_tokens=2, temperature=1.0))[0]
    assert len(set(first)) > 1


def test_compiled_training_step_matches_eager():
    torch.manual_seed(0)
    model = build_model(GPTConfig.from_depth(2, 512, 128), device="cuda")
    x = torch.randint(0, 512, (4, 128), device="cuda")
    y = torch.randint(0, 512, (4, 128), device="cuda")
    with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
        eager = model(x, y)
    compiled = torch.compile(model, dynamic=False)
    with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
        loss = compiled(x, y)
    loss.backward()
    assert math.isclose(float(loss), float(eager), rel_tol=2e-2)
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


def test_a_real_cuda_out_of_memory_is_recognised():
    from nanochat.training.batch_size.oom import is_oom_error
    total = torch.cuda.get_device_properties(0).total_memory
    with pytest.raises(Exception) as info:
        torch.empty(2 * total, dtype=torch.uint8, device="cuda")     # one plain allocation, twice the card
    assert is_oom_error(info.value)
    torch.cuda.empty_cache()
    torch.zeros(1024, device="cuda")                                  # the device is fine afterwards


def test_stage_row_has_gpu_util_mean_on_cuda(tmp_path, monkeypatch):
    import yaml
    from jobs import runs, spec, stages
    monkeypatch.setenv("NANOCHAT_RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "work"))
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"name": "p", "stages": {"infer": {"kind": "inference_bench", "args": {
        "depth": 2, "vocab_size": 512, "prompt_len": 8, "new_tokens": 16, "num_samples": 2, "diversity_samples": 4}}}}))
    _run, run_dir = runs.create_run(spec.load_pipeline(path), "gpu-util", "local", [])
    stages.run_stage(run_dir, "infer")
    rows = [json.loads(p.read_text()) for p in (run_dir / "rows").glob("*.json")]
    assert rows and all(r["device_name"] == torch.cuda.get_device_name(0) for r in rows)
    assert all(isinstance(r["gpu_util_mean"], float) and 0 <= r["gpu_util_mean"] <= 100 for r in rows)

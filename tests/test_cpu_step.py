"""The CPU training step's routes: compile where the hardware can and the run is long enough to pay the
compile back, fp32 eager otherwise (and always when asked: the exact reference); the side-by-side bench."""
import argparse
import json

import pytest
import torch

import nanochat.cpu_features
from nanochat.recipes import base_train
from nanochat.prepare import data_dir
from nanochat.training import routes
from nanochat.training.routes import CPU_COMPILE_MIN_TRAIN_FLOPS, resolve_compile

from helpers import pretraining_base

VOCAB = 512


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return pretraining_base(tmp_path_factory.mktemp("base"), VOCAB)


def test_cpu_compiles_only_for_long_runs_where_inductor_can(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(nanochat.cpu_features, "cpu_can_compile", lambda: True)
    assert resolve_compile("auto", cpu, train_flops=CPU_COMPILE_MIN_TRAIN_FLOPS) is True
    assert resolve_compile("auto", cpu, train_flops=CPU_COMPILE_MIN_TRAIN_FLOPS / 2) is False  # would not pay back
    assert resolve_compile("auto", cpu) is False            # the work is not known (the batch-size search)
    assert resolve_compile("off", cpu, train_flops=1e30) is False  # fp32 eager stays available
    assert resolve_compile("on", cpu, train_flops=0) is True and resolve_compile(True, cpu) is True
    assert resolve_compile("auto", cuda) is True and resolve_compile("auto", torch.device("mps"), 1e30) is False
    monkeypatch.setattr(nanochat.cpu_features, "cpu_can_compile", lambda: False)
    assert resolve_compile("auto", cpu, train_flops=1e30) is False  # no C++ compiler / vector ISA: eager
    assert resolve_compile("on", cpu) is True                       # asked for: the user's call


def test_fast_precision_takes_bf16_on_avx512_bf16_only_when_compiled(monkeypatch):
    from nanochat.training.routes import train_precision_route
    cpu = torch.device("cpu")
    monkeypatch.setattr(nanochat.cpu_features, "cpu_has_amx", lambda: False)
    monkeypatch.setattr(nanochat.cpu_features, "cpu_has_fast_bf16", lambda: True)   # AVX512-BF16, no AMX
    assert train_precision_route("fast", cpu, compiled=True) == "bf16"
    assert train_precision_route("fast", cpu, compiled=False) == "fp32"  # eager bf16 measured 0.53x
    assert train_precision_route("auto", cpu, compiled=True) == "fp32"   # auto stays the exact reference
    assert train_precision_route("fp32", cpu, compiled=True) == "fp32"
    monkeypatch.setattr(nanochat.cpu_features, "cpu_has_fast_bf16", lambda: False)  # bf16 emulated
    assert train_precision_route("fast", cpu, compiled=True) == "fp32"
    monkeypatch.setattr(nanochat.cpu_features, "cpu_has_amx", lambda: True)
    assert train_precision_route("fast", cpu, compiled=False) == "bf16"


def test_cpu_can_compile_needs_a_compiler_and_a_vector_isa(monkeypatch):
    import torch._inductor.cpp_builder as cpp_builder
    import torch._inductor.cpu_vec_isa as cpu_vec_isa
    monkeypatch.setattr(cpu_vec_isa, "pick_vec_isa", lambda: cpu_vec_isa.invalid_vec_isa)
    nanochat.cpu_features.cpu_can_compile.cache_clear()
    assert nanochat.cpu_features.cpu_can_compile() is False
    monkeypatch.setattr(cpu_vec_isa, "pick_vec_isa", lambda: cpu_vec_isa.VecAVX2())

    def no_compiler():
        raise RuntimeError("no C++ compiler")
    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    nanochat.cpu_features.cpu_can_compile.cache_clear()
    assert nanochat.cpu_features.cpu_can_compile() is False
    monkeypatch.undo()
    nanochat.cpu_features.cpu_can_compile.cache_clear()


def _losses(out_dir):
    import csv
    with open(out_dir / "metrics.csv") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


@pytest.mark.slow
def test_short_cpu_run_stays_fp32_eager_and_exact(base_dir, tmp_path, monkeypatch):
    """compile/precision auto on a CPU for a run below the payback: the very same fp32 eager steps as
    `precision: fp32, compile: off` (bitwise); a run above it would compile, unless inductor cannot."""
    common = dict(base_dir=str(base_dir), vocab_size=VOCAB, depth=1, seq_len=32, device_batch_size=2,
                  num_steps=3, eval_tokens=256, log_every=1, num_shards=3, data_max_chars=400_000)
    monkeypatch.setattr(nanochat.cpu_features, "cpu_can_compile", lambda: True)
    auto = base_train.run(base_train.BaseTrainConfig(out_dir=str(tmp_path / "auto"), **common))
    exact = base_train.run(base_train.BaseTrainConfig(out_dir=str(tmp_path / "exact"), compile="off",
                                                      precision="fp32", **common))
    assert auto["compile"] is False and exact["compile"] is False
    assert _losses(tmp_path / "auto") == _losses(tmp_path / "exact")
    # the same short run with no payback needed, on a CPU inductor cannot generate code for: eager
    monkeypatch.setattr(routes, "CPU_COMPILE_MIN_TRAIN_FLOPS", 0.0)
    monkeypatch.setattr(nanochat.cpu_features, "cpu_can_compile", lambda: False)
    fallback = base_train.run(base_train.BaseTrainConfig(out_dir=str(tmp_path / "fallback"), **common))
    assert fallback["compile"] is False and _losses(tmp_path / "fallback") == _losses(tmp_path / "exact")


@pytest.mark.slow
def test_bench_compare_cpu_step_reports_each_route(base_dir, capsys):
    from jobs.bench import train as bench_train
    p = argparse.ArgumentParser()
    bench_train.add_arguments(p)
    args = p.parse_args(["--depth", "1", "--seq-len", "32", "--device-batch-size", "2", "--steps", "4",
                         "--vocab-size", str(VOCAB), "--base-dir", str(base_dir), "--compare-cpu-step",
                         "--routes", "bf16-eager", "--data-source",
                         str(data_dir(base_dir, num_shards=3, max_chars=400_000)), "--json"])
    assert bench_train.run(args) == 0
    printed = capsys.readouterr().out
    out = json.loads(printed.strip().splitlines()[-1])
    assert "training here: compile auto ->" in printed
    assert set(out["routes"]) == {"fp32-eager", "bf16-eager"}
    base, bf16 = out["routes"]["fp32-eager"], out["routes"]["bf16-eager"]
    assert base["ratio"] == 1.0 and base["max_rel_dev"] == 0.0 and bf16["tokens_per_s"] > 0
    curves = out["loss_curves"]
    assert len(curves["fp32-eager"]) == 4 and curves["bf16-eager"] != curves["fp32-eager"]  # autocast took effect
    assert bf16["max_rel_dev"] < 0.02 and bf16["compile_s"] == 0.0
    assert out["training_routes"]["compile_auto_long_run"] == nanochat.cpu_features.cpu_can_compile()
    args.routes = "fp32-eager,fp16-compile"
    from nanochat.errors import ConfigError
    with pytest.raises(ConfigError, match="fp16-compile"):
        bench_train.run(args)


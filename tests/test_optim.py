"""Muon on a CPU: the matrices of one shape are orthogonalised together, to the per-matrix result."""
import pytest
import torch

import nanochat.optim as optim
from nanochat.gpt import GPT, GPTConfig
from nanochat.optim import Muon


def _model_with_grads(seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig.from_depth(2, 256, 32))
    model.init_weights()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    return model


def _muon_steps(stack: bool, steps: int = 3) -> tuple[dict, list]:
    model = _model_with_grads()
    muon = Muon(list(model.transformer.h.parameters()), stack=stack)
    for k in range(steps):
        for p in model.parameters():  # a new gradient each step, the same for both runs
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(k * 1000 + p.numel()))
        muon.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}, [muon.state[p]["momentum_buffer"]
                                                                           for p in model.transformer.h.parameters()]


@pytest.mark.parametrize("ns_dtype", [torch.float32, torch.bfloat16])
def test_stacked_muon_equals_the_per_matrix_step(ns_dtype, monkeypatch):
    monkeypatch.setattr(optim, "_NS_DTYPE_CPU", ns_dtype)
    calls = []
    ns = optim.zeropower_via_newtonschulz5
    monkeypatch.setattr(optim, "zeropower_via_newtonschulz5", lambda G, steps=5: calls.append(G.shape) or ns(G, steps))
    stacked, stacked_momentum = _muon_steps(stack=True)
    # one batched Newton-Schulz per shape and step: (128, 128) for q, k, v and proj; two for the MLP
    shapes = {tuple(p.shape) for p in _model_with_grads().transformer.h.parameters()}
    assert len(calls) == 3 * len(shapes) and all(len(c) == 3 for c in calls), calls
    assert sum(c[0] for c in calls) == 3 * len(list(_model_with_grads().transformer.h.parameters()))
    calls.clear()
    single, single_momentum = _muon_steps(stack=False)
    assert all(c[0] == 1 for c in calls)
    tol = 1e-5 if ns_dtype == torch.float32 else 1e-3  # bf16: a batched matmul may round its sums differently
    for name in stacked:
        diff = (stacked[name] - single[name]).abs().max().item()
        assert diff <= tol, (name, diff)
    assert all(torch.equal(a, b) for a, b in zip(stacked_momentum, single_momentum))


def test_bench_train_compare_muon_prints_the_ratio_and_the_weight_gap(capsys):
    import argparse
    import json
    from jobs.bench import train as bench_train
    p = argparse.ArgumentParser()
    bench_train.add_arguments(p)
    assert bench_train.run(p.parse_args(["--compare-muon", "--depth", "1", "--steps", "2", "--rounds", "1",
                                         "--vocab-size", "256", "--json"])) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["mode"] == "muon" and out["matrices"] == 6 and out["shapes"] == 3
    assert out["stacked_step_ms"] > 0 and out["ratio_stacked_vs_per_matrix"] > 0 and out["max_weight_diff"] < 1e-3

import pytest
import torch


@pytest.fixture
def fp32_muon(monkeypatch):
    """Muon's Newton-Schulz step in fp32 on the CPU. Tests that compare two mathematically equal
    splits of one optimizer step (micro-batches, OOM fallback) need it: bf16 rounding inside the
    orthogonalisation turns 1e-7 summation-order noise into 1e-3 differences, hiding what the test
    is about (a lost step or a wrong normalisation moves weights by ~1e-2)."""
    import nanochat.optim
    monkeypatch.setattr(nanochat.optim, "_NS_DTYPE_CPU", torch.float32)

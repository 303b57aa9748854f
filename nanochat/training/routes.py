"""
How a training step computes: its matmul precision (bf16 autocast or fp32) and whether it is
torch.compile'd, decided here once for base/mid training, SFT and the batch-size trials that stand in
for their steps. A leaf: it imports no other training module.

Precision (PRECISION_CHOICES), for every route weights, gradients and optimizer state stay fp32:
- auto: bf16 autocast on CUDA; fp32 on a CPU, the exact reference the tests and smoke runs compare against.
- fast: bf16 autocast where it makes a training step faster: CUDA, CPUs with AMX, and CPUs with
  AVX512-BF16 when the step is compiled (inductor fuses the casts into the kernels around the
  matmuls). fp32 elsewhere: an eager step there pays more for the casts than the bf16 matmuls save,
  and without the instructions bf16 is emulated (README, measured figures: "CPU training step").
- fp32 / bf16: as said, anywhere.
"""
from __future__ import annotations

import contextlib

import torch

from nanochat import cpu_features
from nanochat.gpt import CompiledGPT

PRECISION_CHOICES = ("auto", "fast", "fp32", "bf16")
COMPILE_CHOICES = {"auto": None, "on": True, "true": True, "1": True, "off": False, "false": False, "0": False}


def train_precision_route(choice: str, device: torch.device, compiled: bool = False) -> str:
    """"bf16" (autocast) or "fp32" for `choice` on `device`; `compiled`: the step is torch.compile'd."""
    if choice not in PRECISION_CHOICES:
        raise ValueError(f"precision {choice!r}: choose one of {', '.join(PRECISION_CHOICES)}")
    if choice in ("fp32", "bf16"):
        return choice
    if device.type == "cuda":
        return "bf16"
    if choice == "fast" and device.type == "cpu" and (
            cpu_features.cpu_has_amx() or (compiled and cpu_features.cpu_has_fast_bf16())):
        return "bf16"
    return "fp32"


def autocast_context(precision: str, device: torch.device):
    """A zero-argument factory of the autocast context for a routed precision ("bf16" or "fp32")."""
    if precision == "bf16":
        return lambda: torch.amp.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


# compile: auto on a CPU. Inductor's CPU code fuses the elementwise work around the matmuls (rotary,
# norms, relu^2, softcap, cross-entropy and their backward) that eager runs as separate memory-bound
# passes, but its first step compiles for tens of seconds. So auto compiles only a run with enough
# work ahead to pay that back about twice over (train FLOPs = steps x tokens per step per rank x flops
# per token), and only where inductor can generate vector code (cpu_features.cpu_can_compile). Compile
# time and step time are both CPU-bound, so a threshold in FLOPs carries over to faster CPUs:
# payback work = compile s x eager FLOP/s / (1 - 1/speedup). The threshold comes from the measured
# speed-ups and compile times of `bench train --compare-cpu-step` (README, measured figures).
CPU_COMPILE_MIN_TRAIN_FLOPS = 5e13


def resolve_compile(setting, device: torch.device, train_flops: float | None = None) -> bool:
    """compile: auto | on | off (a bool also works). auto: on for cuda; on a CPU only when train_flops
    (this rank's training work, known once the step count and batch are) reaches
    CPU_COMPILE_MIN_TRAIN_FLOPS and inductor can build CPU code; off elsewhere and whenever train_flops
    is not given (the batch-size search, which runs eager on a CPU anyway)."""
    flag = COMPILE_CHOICES[str(setting).lower()]
    if flag is not None:
        return flag
    if device.type == "cuda":
        return True
    return (device.type == "cpu" and train_flops is not None and train_flops >= CPU_COMPILE_MIN_TRAIN_FLOPS
            and cpu_features.cpu_can_compile())


def compile_model(model, backend=None, dynamic: bool | None = None):
    """THE compile of base and mid training (and of the batch-size probe that serves them, so the
    graphs it builds are the ones training runs): by region (gpt.CompiledGPT), so gradient buckets
    overlap backward. dynamic None, dynamo's default: a graph for the first batch size, then one with
    a symbolic batch size for every other (the probe's trial sizes, an out-of-memory fallback's smaller
    micro-batch) instead of a compile per size; a run at one size compiles once, as with dynamic=False."""
    return CompiledGPT(model, backend=backend, dynamic=dynamic)


class CompileCounter:
    """A torch.compile backend that counts the graphs handed to it (one per compilation or
    recompilation of a frame) and then compiles them with inductor as the default backend does."""

    def __init__(self):
        self.count = 0

    def __call__(self, gm, example_inputs):
        self.count += 1
        from torch._inductor.compile_fx import compile_fx
        return compile_fx(gm, example_inputs)


def compile_sft(model) -> tuple[torch.nn.Module, CompileCounter]:
    """THE compile of SFT's compiled modes: fixed shapes (dynamic=False), graphs counted. Fresh dynamo
    caches first: a second model in this process must not eat the recompile limit."""
    counter = CompileCounter()
    torch._dynamo.reset()
    return CompiledGPT(model, backend=counter), counter  # by region: GradientBuckets overlaps backward


def num_compiles() -> int:
    """Graphs dynamo has compiled in this process (its unique_graphs counter); 0 where it cannot say."""
    try:
        from torch._dynamo.utils import counters
        return int(counters["stats"]["unique_graphs"])
    except Exception:   # torch without dynamo's counters (an older or stripped build): no count, not an error
        return 0

"""
The entry points of the automatic batch size: the options of a base or mid training run
(training_options, derived in this one place), the cache key derived from a run's options
(key_inputs), resolve (the cache, else the search) and fallback_after_oom (a real training step ran
out of memory after all).
"""
from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist

from nanochat.device import device_name, device_total_memory
from nanochat.distributed import collective_device, dist_active, print0
from nanochat.errors import ConfigError
from nanochat.optim import build_optimizers
from nanochat.training.batch_size.budget import budget_search_job, default_cpu_budget_gb, run_under_memory_budget
from nanochat.training.batch_size.cache import (SPEED_CHOICE_TTL_S, cache_key, default_cache_dir, kept_entry,
                                                read_cache, update_cache, write_cache)
from nanochat.training.batch_size.oom import free_memory
from nanochat.training.batch_size.options import SearchOptions
from nanochat.training.batch_size.search import SearchResult, search_on_model
from nanochat.training.batch_size.trial import TrainStep
from nanochat.training.geometry import largest_divisor_at_most, rows_per_rank
from nanochat.training.routes import resolve_compile, train_precision_route

# Bump when the trial step changes in a way that changes its memory: old cache entries stop matching.
STEP_VERSION = 2   # 2: the margin on bytes, trials at divisors only, training's forward_backward


def training_options(model, seq_len: int, total_batch_size: int, world_size: int, device: torch.device,
                     compile_setting, precision: str = "auto") -> SearchOptions:
    """The options (and so the cache key) of the automatic device batch size for a base or mid
    training run: THE one place they are derived. The training loop and the probe stage that serves
    it both call this, so the entry a probe writes is the entry training reads. build_optimizers
    itself: optimizer memory does not depend on the learning rates; the trial steps run under the
    training's own autocast (bf16 activations take half the memory of fp32 ones). The step count is not
    known here, so on a CPU compile auto and precision fast are keyed as the eager fp32 step (the search
    runs eager there anyway; a compiled or bf16 step usually takes less memory)."""
    autocast = "bfloat16" if train_precision_route(precision, device) == "bf16" else None
    return SearchOptions(model, build_optimizers, seq_len, total_batch_size, world_size, device,
                         compile=resolve_compile(compile_setting, device), vocab_size=model.config.vocab_size,
                         autocast_dtype=autocast)


def _describe_model(model) -> dict:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        desc = {"config": config.to_dict()}
    else:
        desc = {"shapes": [list(p.shape) for p in model.parameters()]}
    desc["class"] = type(getattr(model, "_orig_mod", model)).__qualname__
    desc["param_dtype"] = str(next(model.parameters()).dtype)
    return desc


def _describe_callable(fn) -> str:
    if fn is None:
        return "default"
    if hasattr(fn, "__dataclass_fields__"):
        return f"{type(fn).__module__}.{type(fn).__qualname__}"
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"



@dataclass
class KeyInputs:
    """What the cache key is made of, and the options completed on the way (the search runs with them:
    a torch device, a step function, compile decided, the CPU budget settled)."""
    key: str
    parts: dict
    rows: int
    options: SearchOptions


def key_inputs(opts: SearchOptions) -> KeyInputs:
    """THE derivation of the batch-size cache key (and of the search's settings) from what a training
    run is: its model, optimizers, step, seq_len, total batch, world size, device, compile, autocast
    (and on CPU the memory budget); not the search's policy (margin, speed check), which a probe may
    set and still fill the entry its training reads. resolve calls it, and so do the probe stage and
    the tests that check that the key a probe writes is the key its training stage reads. Needs no
    memory: the model may live on the meta device (only its config, class and parameter dtype are
    read) when the device is given."""
    model = opts.model
    device = torch.device(opts.device) if opts.device is not None else next(model.parameters()).device
    rows = rows_per_rank(opts.total_batch_size, opts.seq_len, opts.world_size)
    compile = bool(opts.compile) or hasattr(model, "_orig_mod")  # an already compiled model trains compiled
    autocast_dtype = opts.autocast_dtype
    if autocast_dtype == "auto":
        autocast_dtype = "bfloat16" if device.type == "cuda" else None
    step_fn = opts.step_fn
    if step_fn is None:
        step_fn = TrainStep(seq_len=opts.seq_len, vocab_size=opts.vocab_size or model.config.vocab_size,
                            world_size=opts.world_size, autocast_dtype=autocast_dtype)
    # CPU: None = half the total memory, 0 = no budget (trials run in this process; only safe
    # when something else bounds the sizes, e.g. a step_fn that fails above a size).
    memory_budget_gb = opts.memory_budget_gb
    if device.type == "cpu" and memory_budget_gb is None:
        memory_budget_gb = round(default_cpu_budget_gb(), 1)
    if device.type != "cpu" or not memory_budget_gb:
        memory_budget_gb = None  # on a GPU the device's own memory is the budget
    parts = {
        "step_version": STEP_VERSION,
        "model": _describe_model(model),
        "seq_len": opts.seq_len,
        "rows_per_rank": rows,
        "multi_rank": opts.world_size > 1,   # the gradient all-reduce buffer exists only then
        "autocast": autocast_dtype,
        "compile": compile,
        "optimizers": _describe_callable(opts.optimizers_factory),
        "step": _describe_callable(step_fn),
        "device": device_name(device),
        "device_memory": device_total_memory(device),
        "torch": torch.__version__,
        "memory_budget_gb": memory_budget_gb,
        # not the margin nor the speed-check settings: they are the probe's policy, not what training
        # is; a probe with its own margin must still fill the entry training reads (they are in the entry)
        **(opts.cache_extra or {}),
    }
    completed = replace(opts, device=device, compile=compile, step_fn=step_fn, memory_budget_gb=memory_budget_gb,
                        autocast_dtype=autocast_dtype)
    return KeyInputs(key=cache_key(parts), parts=parts, rows=rows, options=completed)


class Resolved(NamedTuple):
    """resolve's answer: device_batch_size * seq_len * world_size * grad_accum == total_batch_size."""
    device_batch_size: int
    grad_accum: int
    source: str          # "cache" or "probe"
    info: dict           # cache_key, cache_dir, rows_per_rank, max_found, trials, seconds, ...


def resolve(opts: SearchOptions) -> Resolved:
    """Decide the device batch size for training opts.model at opts.seq_len with opts.total_batch_size
    tokens per optimizer step over opts.world_size ranks: the cache entry of its key, else the search.
    The size kept is the largest divisor of the rows per rank whose trial step runs within
    (1 - safety_margin) of the device's memory (on a CPU: of memory_budget_gb, in a child process).
    opts.compiled: the training's own compiled module (compile on): the compiled trials step it, so the
    graphs they build serve the training that follows (not in the CPU budget child: another process).
    opts.time_limit_s: the search stops starting trials after this long and keeps the best size so far
    (info["stopped_by_deadline"]). Under torch.distributed every rank must call it; all ranks return
    the same numbers."""
    if not 0.0 <= opts.safety_margin < 1.0:
        raise ConfigError(f"safety_margin: {opts.safety_margin} must be in [0, 1)")
    t0, started_at = time.perf_counter(), time.time()
    deadline = opts.clock() + opts.time_limit_s if opts.time_limit_s else None
    ki = key_inputs(opts)
    opts, rows, key = ki.options, ki.rows, ki.key
    device = opts.device
    cache_dir = Path(opts.cache_dir) if opts.cache_dir else default_cache_dir(opts.base_dir)
    info = {"cache_key": key, "cache_dir": str(cache_dir), "rows_per_rank": rows,
            "memory_budget_gb": opts.memory_budget_gb}
    is_rank0 = not dist_active() or dist.get_rank() == 0

    # Rank 0 reads the cache and tells the others, so a write racing with the reads cannot split them.
    entry = read_cache(cache_dir, key, rows) if (opts.use_cache and not opts.refresh_cache and is_rank0) else None
    hit = _broadcast_ints([entry["device_batch_size"], entry.get("max_found") or 0] if entry else [0, 0], device)
    if hit[0] > 0:
        bs = hit[0]
        info.update(max_found=hit[1], trials=(entry or {}).get("trials", []), seconds=time.perf_counter() - t0)
        return Resolved(bs, rows // bs, "cache", info)

    if opts.memory_budget_gb is not None and device.type == "cpu":
        result = _search_in_budget_child(opts, rows, deadline, is_rank0)
    else:
        result = search_on_model(opts, rows, deadline)

    info.update(max_found=result.max_found, first_failure=result.first_failure,
                stopped_by_speed=result.stopped_by_speed, trials=result.trials,
                seconds=time.perf_counter() - t0, baseline=result.baseline,
                stopped_by_deadline=result.stopped_by_deadline, compile_confirmed=result.compile_confirmed,
                speed=result.speed, memory_baseline_bytes=result.memory_baseline or None)
    if result.stopped_by_deadline:
        print0(f"auto batch size: time limit ({opts.time_limit_s:.0f} s) reached; keeping device batch "
               f"{result.device_batch_size}, the best found so far (a later --refresh can search further)")
    if opts.use_cache and is_rank0:
        entry = {
            "device_batch_size": result.device_batch_size, "grad_accum": result.grad_accum,
            "max_found": result.max_found, "first_failure": result.first_failure, "baseline": result.baseline,
            "stopped_by_speed": result.stopped_by_speed, "stopped_by_deadline": result.stopped_by_deadline,
            "compile_confirmed": result.compile_confirmed, "speed": result.speed,
            "trials": result.trials, "source": "probe", "safety_margin": opts.safety_margin,
            "stop_gain": opts.stop_gain, "parts": ki.parts,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "probe_started_at": started_at,   # against a run-time fallback recorded meanwhile (kept_entry)
        }
        if result.stopped_by_speed:
            # below the memory baseline on timings alone: measure again after a while rather than forever
            entry["expires_at"] = time.time() + SPEED_CHOICE_TTL_S
        write_cache(cache_dir, key, entry)
    return Resolved(result.device_batch_size, result.grad_accum, "probe", info)


def _search_in_budget_child(opts: SearchOptions, rows: int, deadline: float | None, is_rank0: bool) -> SearchResult:
    """The search in a child under the CPU budget; with several ranks, rank 0 searches and broadcasts."""
    result, failure = None, None
    if is_rank0:
        job = replace(opts, model=copy.deepcopy(getattr(opts.model, "_orig_mod", opts.model)).cpu(), compiled=None)
        try:
            # the margin applied to bytes: the child's limit is (1 - margin) of the budget
            result = run_under_memory_budget(budget_search_job, (job, rows, deadline),
                                             opts.memory_budget_gb * (1.0 - opts.safety_margin),
                                             threads=opts.budget_child_threads)
        except Exception as e:  # noqa: BLE001 - the other ranks must hear of it before it is raised
            failure = e
        del job
    got = _broadcast_ints([result.device_batch_size, result.max_found] if result else [0, 0], opts.device)
    if failure is not None:
        raise failure
    if got[0] < 1:
        raise RuntimeError("rank 0's memory-budget probe failed (see its log)")
    if result is None:
        result = SearchResult(device_batch_size=got[0], grad_accum=rows // got[0], max_found=got[1],
                              first_failure=None, stopped_by_speed=False)
    return result


def _broadcast_ints(values: list[int], device: torch.device) -> list[int]:
    """Rank 0's values on every rank (identity without torch.distributed)."""
    if not dist_active():
        return [int(v) for v in values]
    t = torch.tensor(values, dtype=torch.int64, device=collective_device(device))
    dist.broadcast(t, src=0)
    return [int(v) for v in t.tolist()]


def fallback_after_oom(device_batch_size: int, grad_accum: int, cache_key: str | None = None,
                       cache_dir: str | os.PathLike | None = None, device: torch.device | None = None) -> tuple[int, int]:
    """A real training step ran out of memory: returns (new_bs, new_accum) with the device batch
    halved (the largest divisor of the rows per rank at most half) and accumulation raised so
    new_bs * new_accum == device_batch_size * grad_accum. Frees cached memory and records the new
    size in the cache entry (if cache_key and cache_dir are given) so later runs start from it.
    The caller zeroes its gradients and redoes the same optimizer step. Raises MemoryError at 1."""
    rows = device_batch_size * grad_accum
    new_bs = largest_divisor_at_most(rows, device_batch_size // 2)
    if new_bs < 1:
        raise MemoryError("out of memory at device batch size 1: nothing smaller to fall back to")
    new_accum = rows // new_bs
    free_memory(device)
    print0(f"auto batch size: out of memory at device batch {device_batch_size}; "
           f"continuing at {new_bs} x {new_accum} accumulation steps (same total batch)")
    if cache_key and cache_dir and (not dist_active() or dist.get_rank() == 0):
        def record(old: dict | None) -> dict | None:   # runs under the entry's lock, on what is there now
            old = old or {}
            history = list(old.get("fallbacks", [])) + [{"from": device_batch_size, "to": new_bs, "at_unix": time.time(),
                                                         "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}]
            return kept_entry(old or None, dict(old, device_batch_size=new_bs, grad_accum=new_accum,
                                                source="fallback", fallbacks=history))
        update_cache(cache_dir, cache_key, record)
    return new_bs, new_accum


"""
`python -m jobs bench batch`: the automatic device batch size on this machine.
- probes a model shape (on CPU under a real memory budget), reporting trials and seconds;
- resolves it again and times the cache hit (should be well under 0.1 s);
- trains a few optimizer steps at the same total batch with the size found and with a fixed
  baseline size (default 1, the guess that always fits), and prints tokens/s and their ratio;
- shows whether the earlier fork's int(0.85 x max) would have kept the total batch exact;
- compares, under the same budget in the same run, the size kept now (the margin on bytes: the
  training's step, compiled with --compile on, within (1 - margin) of the budget) with the size the
  rows rule kept before (an eager search under the whole budget, floor((1 - margin) x the largest
  size that fits) rounded down to a divisor), and says what share of the budget the size kept uses.
With --json the last line is one JSON object with these figures.
"""
from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from nanochat.training.batch_size.options import DEFAULT_SAFETY_MARGIN, SearchOptions
from nanochat.training.batch_size.resolve import resolve
from nanochat.training.batch_size.trial import TrainStep
from nanochat.training.geometry import rows_per_rank
from nanochat.device import autodetect_device_type, device_name, synchronize
from nanochat.errors import ConfigError
from nanochat.gpt import GPTConfig, build_model
from nanochat.optim import build_optimizers


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--depth", type=int, default=4, help="model depth (width = 64 * depth)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per row")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--total-batch-size", type=int, default=0, help="tokens per optimizer step (default: 32 rows)")
    parser.add_argument("--memory-budget-gb", type=float, default=1.0, help="CPU probe budget (ignored on GPUs)")
    parser.add_argument("--safety-margin", type=float, default=DEFAULT_SAFETY_MARGIN)
    parser.add_argument("--stop-gain", type=float, default=-1.0,
                        help="throughput stop threshold (<0: off, so the found size is the memory limit's)")
    parser.add_argument("--baseline-batch-size", type=int, default=1, help="the fixed size compared against")
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps per variant (after one warm-up)")
    parser.add_argument("--device", default="", help="cpu, cuda or mps (default: auto)")
    parser.add_argument("--compile", choices=["off", "on"], default="off",
                        help="search with the compiled step, as a compiled training does (default: %(default)s)")
    parser.add_argument("--cache-dir", default="", help="cache folder (default: a fresh temporary one)")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")


def tokens_per_s(model, device_batch_size: int, grad_accum: int, seq_len: int, vocab_size: int,
                 steps: int, device: torch.device) -> float:
    """Optimizer steps of device_batch_size x grad_accum rows; tokens/s over the timed steps."""
    optimizers = build_optimizers(model)
    autocast = device.type == "cuda"  # bf16 on cuda, as training runs

    def one_step():
        for _ in range(grad_accum):
            idx = torch.randint(0, vocab_size, (device_batch_size, seq_len + 1), device=device)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16) if autocast else nullcontext():
                loss = model(idx[:, :-1], idx[:, 1:]) / grad_accum
            loss.backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)

    one_step()  # warm-up: allocates optimizer state
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        one_step()
    synchronize(device)
    return device_batch_size * grad_accum * seq_len * steps / (time.perf_counter() - t0)


@dataclass
class RowsRuleStep:
    """The rows rule of before, reproduced on the divisor search: it kept a divisor d when the eager
    step at ceil(d / (1 - margin)) rows fitted the whole budget (d <= floor((1 - margin) x max fit))."""
    step: TrainStep
    margin: float

    def __call__(self, model, optimizers, batch_size: int) -> None:
        self.step(model, optimizers, math.ceil(batch_size / (1.0 - self.margin) - 1e-9))


def rows_rule_size(model, args, total: int, device: torch.device) -> int:
    step = RowsRuleStep(TrainStep(args.seq_len, args.vocab_size, autocast_dtype="bfloat16" if device.type == "cuda"
                                  else None), args.safety_margin)
    bs, _accum, _source, _info = resolve(SearchOptions(
        model, build_optimizers, args.seq_len, total, 1, device, step, safety_margin=0.0, stop_gain=None,
        memory_budget_gb=args.memory_budget_gb, use_cache=False))
    return bs


def run(args: argparse.Namespace) -> int:
    if args.steps < 1:
        raise ConfigError(f"bench batch --steps: need at least 1, got {args.steps}")
    device = torch.device(args.device or autodetect_device_type())
    total = args.total_batch_size or 32 * args.seq_len
    rows = rows_per_rank(total, args.seq_len, 1)
    if rows % args.baseline_batch_size:
        raise ConfigError(f"bench batch --baseline-batch-size: {args.baseline_batch_size} does not divide {rows} rows")
    torch.manual_seed(0)
    model = build_model(GPTConfig.from_depth(args.depth, args.vocab_size, args.seq_len), device)
    with tempfile.TemporaryDirectory(prefix="bench-batch-cache-") as tmp:
        cache_dir = args.cache_dir or tmp
        opts = dict(safety_margin=args.safety_margin, stop_gain=(args.stop_gain if args.stop_gain >= 0 else None),
                    memory_budget_gb=args.memory_budget_gb, cache_dir=cache_dir, compile=args.compile == "on")
        bs, accum, source, info = resolve(SearchOptions(model, build_optimizers, args.seq_len, total, 1, device,
                                                        **opts))
        t0 = time.perf_counter()
        bs2, accum2, source2, _ = resolve(SearchOptions(model, build_optimizers, args.seq_len, total, 1, device,
                                                        **opts))
        hit_s = time.perf_counter() - t0
    assert (bs2, accum2) == (bs, accum), "the cache returned a different size"
    before_bs = rows_rule_size(model, args, total, device)
    kept = next((t for t in reversed(info["trials"]) if t["ok"] and t["batch_size"] == bs), {})
    capacity = args.memory_budget_gb * 1024 ** 3 if device.type == "cpu" else torch.cuda.get_device_properties(device).total_memory
    peak = kept.get("peak_memory_bytes")
    used = (peak - (info.get("memory_baseline_bytes") or 0)) / capacity if peak else None
    naive = int(0.85 * info["max_found"])
    tps_auto = tokens_per_s(model, bs, accum, args.seq_len, args.vocab_size, args.steps, device)
    base_bs = args.baseline_batch_size
    tps_base = tokens_per_s(model, base_bs, rows // base_bs, args.seq_len, args.vocab_size, args.steps, device)
    result = {
        "device_name": device_name(device), "depth": args.depth, "seq_len": args.seq_len, "total_batch_size": total,
        "memory_budget_gb": info.get("memory_budget_gb"), "probe_source": source,
        "device_batch_size": bs, "grad_accum": accum, "max_found": info["max_found"],
        "first_failure": info.get("first_failure"), "trials": [t["batch_size"] for t in info["trials"] if t.get("phase", "memory") == "memory"],
        "probe_seconds": round(info["seconds"], 3), "cache_source": source2, "cache_hit_seconds": round(hit_s, 5),
        "earlier_fork_size": naive, "earlier_fork_exact": naive > 0 and rows % naive == 0,
        "baseline_batch_size": base_bs, "tokens_per_s_auto": round(tps_auto, 1),
        "tokens_per_s_baseline": round(tps_base, 1), "speedup_vs_baseline": round(tps_auto / tps_base, 3),
        "compile": args.compile == "on", "safety_margin": args.safety_margin, "rows_rule_batch_size": before_bs,
        "bytes_vs_rows_rule": round(bs / before_bs, 3), "budget_share_used": round(used, 3) if used else None,
    }
    print(f"probe ({source}): trials {result['trials']} -> max {info['max_found']}, first failure "
          f"{info.get('first_failure')}; device batch {bs} x {accum} accumulation = {rows} rows "
          f"in {info['seconds']:.1f} s", flush=True)
    print(f"cache hit ({source2}): {hit_s * 1000:.2f} ms", flush=True)
    print(f"earlier fork int(0.85 x {info['max_found']}) = {naive}: "
          f"{'divides' if result['earlier_fork_exact'] else 'does NOT divide'} {rows} rows per step", flush=True)
    print(f"margin on bytes ({'compiled' if args.compile == 'on' else 'eager'} step): keeps {bs}, using "
          f"{'?' if used is None else f'{100 * used:.0f}%'} of the budget; the rows rule of before (eager): {before_bs}; "
          f"ratio {bs / before_bs:.2f}x", flush=True)
    print(f"tokens/s at the same total batch: auto B={bs}: {tps_auto:,.0f}  baseline B={base_bs}: {tps_base:,.0f}  "
          f"ratio {tps_auto / tps_base:.2f}x", flush=True)
    if args.json:
        print(json.dumps(result, sort_keys=True), flush=True)
    return 0

"""
The training loop shared by base and mid training (nanochat's recipe):
- Muon for the block matrices + AdamW for embedding and lm_head (nanochat.optim.build_optimizers)
- LR: no warmup, constant, then linear warmdown over the last `warmdown_ratio` of the steps;
  Muon momentum warms up 0.85 -> 0.95 over the first 300 steps
- gradient accumulation to an exact total batch in tokens (training.geometry.StepGeometry)
- precision and compile from training.routes: bf16 autocast and torch.compile (by region:
  gpt.CompiledGPT) on CUDA; fp32 on CPU, compiled only for runs long enough to pay the compile back
- torch.distributed from the environment; gradients averaged in buckets while backward runs
  (optim.GradientBuckets), Muon's Newton-Schulz split over the ranks (Muon.shard), the next step's
  rows prepared in a background thread (dataloader.StepRows); overlap: false is the plain path
  (one flat all-reduce after backward, every rank orthogonalises every matrix, rows read in turn)
- each optimizer step's data is fetched whole (rows of tokens) and sliced into micro-batches, so on an
  out-of-memory error the same step is rerun with a smaller device batch (training.retry)
- metrics.csv, checkpoints (resume from the newest valid one: training.resume), val bits per byte
"""
from __future__ import annotations

import functools
import math
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from nanochat.checkpoint import save_checkpoint, set_rng_state
from nanochat.dataloader import StepRows
from nanochat.device import device_name, peak_memory_bytes, reset_peak_memory, synchronize
from nanochat.distributed import DistInfo, any_rank, print0
from nanochat.optim import GradientBuckets, all_reduce_gradients, build_optimizers, zero_gradients
from nanochat.peaks import device_peaks
from nanochat.training.batch_size.resolve import key_inputs, resolve, training_options
from nanochat.training.config import TrainConfig
from nanochat.training.geometry import StepGeometry
from nanochat.training.metrics import mfu_percent, read_metrics, write_metrics
from nanochat.training.resume import load_latest_checkpoint
from nanochat.training.retry import DeviceBatch, step_with_oom_retry
from nanochat.training.routes import (autocast_context, compile_model, num_compiles, resolve_compile,
                                      train_precision_route)
from nanochat.training.step import forward_backward


# -----------------------------------------------------------------------------
# Schedules

def lr_multiplier(step: int, num_steps: int, warmdown_ratio: float, final_lr_frac: float = 0.0) -> float:
    warmdown_steps = round(warmdown_ratio * num_steps)
    if step < num_steps - warmdown_steps:
        return 1.0
    progress = (num_steps - step) / max(warmdown_steps, 1)
    return progress * 1.0 + (1 - progress) * final_lr_frac


def muon_momentum(step: int) -> float:
    frac = min(step / 300, 1.0)
    return (1 - frac) * 0.85 + frac * 0.95


# -----------------------------------------------------------------------------
# Batch size

def batch_cache_key(cfg: TrainConfig, model, world_size: int, device: torch.device) -> str:
    """The batch-size cache key this training config looks up (model may live on the meta device)."""
    opts = training_options(model, cfg.seq_len, cfg.total_batch_size, world_size, device, cfg.compile, cfg.precision)
    return key_inputs(opts).key


def resolve_batch(cfg: TrainConfig, model, world_size: int, device: torch.device,
                  compiled=None) -> tuple[DeviceBatch, dict]:
    """The device batch this run starts with (from the config, or the automatic batch size: its cache
    or a probe) and the batch-size info for the row. compiled: the module training will step (compile
    on): the probe's compiled trials step it."""
    T = cfg.seq_len
    if cfg.device_batch_size > 0:
        return DeviceBatch(StepGeometry.from_total(cfg.total_batch_size, cfg.device_batch_size, T, world_size),
                           "config"), {}
    if cfg.total_batch_size <= 0:
        raise cfg.problem("total_batch_size", "must be set (tokens per step) when device_batch_size is 0 (automatic)")
    opts = training_options(model, T, cfg.total_batch_size, world_size, device, cfg.compile, cfg.precision)
    B, accum, source, info = resolve(replace(opts, base_dir=cfg.base_dir or None, compiled=compiled))
    batch = DeviceBatch(StepGeometry(B, accum, T, world_size), source, info.get("cache_key"), info.get("cache_dir"))
    return batch, info


# -----------------------------------------------------------------------------
# Evaluation

@torch.no_grad()
def evaluate_bpb(model, loader, steps: int, B: int, token_bytes: torch.Tensor, device, autocast_ctx) -> float:
    """Bits per byte on the loader's next steps*B rows: summed nats over tokens that have bytes
    (special tokens have none) / (ln 2 * their bytes). Independent of the vocabulary size."""
    was_training = model.training
    model.eval()
    token_bytes = token_bytes.to(device)
    nats = torch.zeros((), dtype=torch.float64, device=device)
    nbytes = torch.zeros((), dtype=torch.float64, device=device)
    for _ in range(steps):
        x, y = loader.next_batch(B, device)
        with autocast_ctx():
            loss = model(x, y, loss_reduction="none").view(-1)
        yv = y.view(-1)
        b = torch.where(yv >= 0, token_bytes[yv.clamp(min=0)], torch.zeros_like(yv, dtype=token_bytes.dtype))
        nats += (loss.double() * (b > 0)).sum()
        nbytes += b.double().sum()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(nats)
        dist.all_reduce(nbytes)
    model.train(was_training)
    return float(nats / (math.log(2) * nbytes.clamp(min=1)))


def _gather_loader_states(loader, ddp: bool) -> dict:
    state = loader.state_dict()
    if not ddp:
        return state
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, state)
    merged: dict = {}
    for s in gathered:
        merged.update(s)
    return merged


# -----------------------------------------------------------------------------
# The loop

def train(cfg: TrainConfig, *, stage: str, model, tokenizer, tokenizer_dir: str, dist_info: DistInfo,
          make_train_loader: Callable, make_val_loader: Callable, should_stop: Callable[[], bool] | None = None,
          extra_meta: dict | None = None) -> dict:
    """Train `model` (built and initialised by the caller) and return result-row columns.
    make_train_loader(rank, world_size, num_streams) / make_val_loader(rank, world_size, num_streams) -> RankLoader."""
    cfg.validate()
    t_start = time.time()
    device = dist_info.device
    rank, world_size, ddp = dist_info.rank, dist_info.world_size, dist_info.ddp
    out_dir = Path(cfg.out_dir) if cfg.out_dir else None
    ckpt_root = out_dir / "checkpoints" if out_dir else None
    opt_factory = functools.partial(build_optimizers, unembedding_lr=cfg.unembedding_lr, embedding_lr=cfg.embedding_lr,
                                    matrix_lr=cfg.matrix_lr, weight_decay=cfg.weight_decay)

    # Batch geometry first (the automatic probe may run trial steps on a copy of the state). A probe
    # that compiles steps the module training will step: its graphs serve the training (one compile).
    compiles_before = num_compiles()
    probes_compiled = cfg.device_batch_size == 0 and resolve_compile(cfg.compile, device)
    probe_compiled = compile_model(model) if probes_compiled else None
    batch, batch_info = resolve_batch(cfg, model, world_size, device, probe_compiled)
    reset_peak_memory(device)  # the probe's largest (failed) trial is not this stage's peak
    T = cfg.seq_len
    rows_per_rank = batch.geometry.rows_per_rank
    total_batch = batch.geometry.total_batch_size
    n_params = model.num_params()
    num_steps = cfg.num_steps or max(1, int(cfg.target_param_data_ratio * n_params // total_batch))
    optimizers = opt_factory(model)
    optimizers[1].shard = cfg.overlap and ddp  # Muon: each rank orthogonalises its share of the matrices
    train_loader = make_train_loader(rank, world_size, cfg.num_streams)

    # Resume from the newest valid checkpoint of this stage, if any.
    start_step = 0
    resumed_loss = None
    model_config = model.config.to_dict()
    ckpt = load_latest_checkpoint(ckpt_root, stage, model, optimizers, device)
    if ckpt is not None:
        train_loader.load_state_dict(ckpt["meta"]["loader"])
        set_rng_state(ckpt["rng"], ckpt["meta"].get("python_rng"), device)
        start_step = int(ckpt["meta"]["step"])
        resumed_loss = ckpt["meta"].get("loss")
        batch.keep_fallback_of(ckpt["meta"])
        print0(f"[{stage}] resumed from {ckpt['path']} at step {start_step}")
        del ckpt

    use_compile = resolve_compile(cfg.compile, device,
                                  train_flops=(num_steps - start_step) * rows_per_rank * T * model.estimate_flops())
    # compiled is asked: on some CPUs bf16 pays only in a compiled step
    precision = train_precision_route(cfg.precision, device, compiled=use_compile)
    autocast_ctx = autocast_context(precision, device)
    # compiled by region, so the gradient buckets overlap backward
    train_model = (probe_compiled or compile_model(model)) if use_compile else model
    flops_per_token = model.estimate_flops()
    token_bytes = tokenizer.token_bytes()
    metrics_path = out_dir / "metrics.csv" if out_dir else None
    metrics = read_metrics(metrics_path, start_step) if (metrics_path and rank == 0) else []

    # Rows of the steps still to run; with overlap the next step's are read while this one computes.
    # Its state_dict is the position after the rows handed out (trained), never the prefetched ones.
    feed = StepRows(train_loader, rows_per_rank, num_steps - start_step, background=cfg.overlap,
                    pin=device.type == "cuda")
    grad_buckets = GradientBuckets(model) if (cfg.overlap and ddp) else None

    def save(step_done: int) -> None:
        loader_state = _gather_loader_states(feed, ddp)  # collective: every rank takes part
        if rank == 0 and ckpt_root is not None:
            meta = {"stage": stage, "model_config": model_config, "train_config": asdict(cfg),
                    "loader": loader_state, "tokenizer_dir": str(tokenizer_dir), "device_batch_size": batch.size,
                    "grad_accum_steps": batch.geometry.grad_accum, "batch_size_source": batch.source,
                    "total_batch_size": total_batch, "num_steps": num_steps, "world_size": world_size,
                    "loss": loss_value, **(extra_meta or {})}
            save_checkpoint(ckpt_root, step_done, model, optimizers, meta, keep=cfg.keep_checkpoints)
        if ddp:
            dist.barrier()

    def run_eval() -> float:
        # Validation is read with the same streams as training, so its rows too are independent
        # of the world size. The device batch as it is now (a fallback shrinks it), a multiple of the streams.
        val_loader = make_val_loader(rank, world_size, cfg.num_streams)
        k = len(val_loader.streams)
        eval_B = max(batch.size - batch.size % k, k)
        eval_steps = max(1, cfg.eval_tokens // (eval_B * T * world_size))
        return evaluate_bpb(model, val_loader, eval_steps, eval_B, token_bytes, device, autocast_ctx)

    print0(f"[{stage}] params={n_params:,} steps={num_steps} B={batch.size} T={T} world={world_size} "
           f"grad_accum={batch.geometry.grad_accum} total_batch={total_batch} ({batch.source}) compile={use_compile}")
    model.train()
    state = "COMPLETED"
    step = start_step
    loss_value = resumed_loss
    timed_tokens, timed_seconds = 0, 0.0
    interval_tokens, interval_seconds = 0, 0.0
    val_bpb = None
    try:
        while step < num_steps:
            synchronize(device)
            t0 = time.time()
            rows, mask = feed.next()
            loss = step_with_oom_retry(
                lambda B: forward_backward(train_model, rows, mask, B, device, autocast_ctx, grad_buckets),
                batch, model=model, grad_buckets=grad_buckets, device=device, label=f"[{stage}]", step=step)
            if grad_buckets is None:
                all_reduce_gradients(model)
            lrm = lr_multiplier(step, num_steps, cfg.warmdown_ratio, cfg.final_lr_frac)
            for opt in optimizers:
                for group in opt.param_groups:
                    group["lr"] = group["initial_lr"] * lrm
            for group in optimizers[1].param_groups:
                group["momentum"] = muon_momentum(step)
            for opt in optimizers:
                opt.step()
            zero_gradients(model, grad_buckets)
            if ddp:
                dist.all_reduce(loss)
                loss /= world_size
            loss_value = float(loss)
            synchronize(device)
            dt = time.time() - t0
            step += 1
            # the first step of this process includes compilation and warm-up: leave it out of the rate,
            # the stage's and its metrics row's (a row that covers only that step has no rate)
            if step > start_step + 1 or num_steps - start_step == 1:
                timed_tokens += total_batch
                timed_seconds += dt
                interval_tokens += total_batch
                interval_seconds += dt

            # Ranks agree before acting on a stop request (USR2 may reach one rank only, or reach them at
            # different steps): a rank that left the loop alone would leave the others in the next collective.
            stop = any_rank(bool(should_stop and should_stop()), device)
            last = step == num_steps
            if stop or last or (cfg.save_every and step % cfg.save_every == 0):
                # saved before evaluation: an eval crash or a time limit never costs the trained weights
                save(step)
            eval_now = last or (cfg.eval_every and step % cfg.eval_every == 0)
            val_this = run_eval() if eval_now else None
            if val_this is not None:
                val_bpb = val_this
            if rank == 0 and (last or stop or step % cfg.log_every == 0 or val_this is not None):
                tps = interval_tokens / interval_seconds if interval_seconds > 0 else None
                row = {"step": step, "loss": round(loss_value, 6), "lrm": round(lrm, 6),
                       "tokens_per_s": round(tps, 2) if tps else None,
                       "mfu": mfu_percent(flops_per_token, tps, device, world_size, cfg.peak_flops) if tps else None,
                       "peak_memory_bytes": peak_memory_bytes(device), "elapsed_s": round(time.time() - t_start, 3),
                       "val_bpb": val_this, "num_steps": num_steps}
                metrics.append(row)
                interval_tokens, interval_seconds = 0, 0.0
                if metrics_path:
                    write_metrics(metrics_path, metrics)
                print0(f"[{stage}] step {step}/{num_steps} loss {loss_value:.4f} lrm {lrm:.3f} "
                       f"tok/s {f'{tps:,.0f}' if tps else '- (warm-up)'}"
                       + (f" val_bpb {val_this:.4f}" if val_this is not None else ""))
            if stop and not last:
                state = "PREEMPTED"
                break
    finally:
        feed.close()  # the prefetch thread never outlives the loop (end, preemption or error)
        if grad_buckets is not None:
            grad_buckets.remove()
    if val_bpb is None and state == "COMPLETED":
        val_bpb = run_eval()

    tokens_per_s = timed_tokens / timed_seconds if timed_seconds > 0 else None
    return {
        "stage_kind": stage, "n_params": n_params, "seq_len": T, "device_batch_size": batch.size,
        "batch_size_source": batch.source, "total_batch_size": total_batch,
        "grad_accum_steps": batch.geometry.grad_accum,
        "steps": step - start_step, "start_step": start_step, "step": step, "num_steps": num_steps,
        "tokens_per_s": tokens_per_s, "real_tokens_per_s": tokens_per_s,
        "mfu": mfu_percent(flops_per_token, tokens_per_s, device, world_size, cfg.peak_flops) if tokens_per_s else None,
        **{k: v for k, v in device_peaks(device, cfg.peak_flops).items() if k.startswith("peak_flops")},
        "peak_memory_bytes": peak_memory_bytes(device), "compile": use_compile,
        "num_compiles": num_compiles() - compiles_before, "final_loss": loss_value, "val_bpb": val_bpb,
        "device_name": device_name(device), "world_size": world_size, "state": state,
        "flops_per_token": flops_per_token, "batch_info": batch_info or None,
    }

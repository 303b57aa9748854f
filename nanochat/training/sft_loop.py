"""
The SFT training loop (nanochat.recipes.sft runs it): conversations already rendered into examples,
batched the way the mode batches them (nanochat.packing), the loss on the assistant's tokens only.

The loss is summed per micro-batch and divided by the number of supervised tokens in the whole
optimizer step, counted over all micro-batches and all ranks before the first backward (nanochat
PR 400), so every supervised token weighs the same however the conversations fell into batches.

The step machinery is training's: the step geometry (training.geometry), the out-of-memory retry with
the ranks agreeing (training.retry), resume (training.resume), the stop agreement
(distributed.any_rank), the metrics file (training.metrics), precision and compile (training.routes:
SFT trains at precision auto; its compiled modes use routes.compile_sft).

Throughput is honest: tokens/s over all positions, over real (non-padding) positions and over
supervised positions, plus the padding fraction. The first optimizer steps (warmup_steps: compilation)
are kept out of the timed window and reported on their own.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
import torch.distributed as dist

from nanochat.checkpoint import save_checkpoint
from nanochat.dataloader import Prefetcher
from nanochat.device import device_name, peak_memory_bytes, reset_peak_memory, synchronize
from nanochat.distributed import any_rank, print0
from nanochat.errors import ConfigError
from nanochat.files import git_commit
from nanochat.gpt import GPT, doc_attention_route
from nanochat.optim import GradientBuckets, all_reduce_gradients, build_optimizers, zero_gradients
from nanochat.packing import PACKED_MODES, Example, batch_for_mode, plan_batches
from nanochat.peaks import device_peaks
from nanochat.tokenizer import Tokenizer
from nanochat.training.batch_size.options import SearchOptions
from nanochat.training.batch_size.resolve import resolve
from nanochat.training.batch_size.trial import reserve_gradient_buckets, reserve_muon_gather
from nanochat.training.geometry import StepGeometry, is_positive_int
from nanochat.training.metrics import mfu_percent, read_metrics, write_metrics
from nanochat.training.resume import load_latest_checkpoint
from nanochat.training.retry import DeviceBatch, step_with_oom_retry
from nanochat.training.routes import CompileCounter, autocast_context, compile_sft, train_precision_route

if TYPE_CHECKING:
    from nanochat.recipes.sft import SFTConfig

ATTENTION_NAMES = {"flex": "flex-document-mask", "sdpa": "sdpa-bool-mask"}  # row extra "attention"


def sft_autocast(device: torch.device):
    """SFT's autocast factory: precision auto (bf16 autocast on CUDA as nanochat trains, fp32 elsewhere)."""
    return autocast_context(train_precision_route("auto", device), device)


# -----------------------------------------------------------------------------
# Batch size

@dataclass
class SFTTrialStep:
    """The automatic batch size's trial step for SFT: a training step on random tokens shaped like
    this mode's batches (rows of seq_len; packed rows carry document ids, so the trial also holds
    the attention mask). A dataclass so it pickles into the CPU probe's memory-budgeted child."""
    seq_len: int
    vocab_size: int
    packed: bool
    world_size: int = 1

    def __call__(self, model, optimizers, batch_size: int) -> None:
        device = next(model.parameters()).device
        x = torch.randint(0, self.vocab_size, (batch_size, self.seq_len), device=device)
        y = torch.randint(0, self.vocab_size, (batch_size, self.seq_len), device=device)
        # contiguous, as packing.build_batch makes them: a compiled trial then meets training's guards
        doc_ids = ((torch.arange(self.seq_len, device=device) // 256).repeat(batch_size, 1).contiguous()
                   if self.packed else None)
        buckets = reserve_gradient_buckets(model) if self.world_size > 1 else None
        with sft_autocast(device)():
            loss = model(x, y, doc_ids=doc_ids, loss_reduction="sum") / y.numel()
        loss.backward()
        gathered = reserve_muon_gather(optimizers) if self.world_size > 1 else None
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        del buckets, gathered


def build_sft_optimizers(model):
    """The optimizers the probe's trials allocate (same state sizes as training's)."""
    return build_optimizers(model)


def default_total_batch_size(cfg: SFTConfig, world_size: int) -> int:
    """Positions per optimizer step: the config's, else 32 rows per rank (nanochat's 32 examples per step)."""
    return cfg.total_batch_size or 32 * cfg.seq_len * world_size


def probe_compiles(cfg: SFTConfig, device: torch.device) -> bool:
    """Does the automatic batch size confirm its size with a compiled step? On CUDA for a compiled mode
    (the compiled step's kernels and workspaces differ from eager's); on a CPU the compiled step uses
    no more memory than the eager one, so no compilation is paid there."""
    return cfg.device_batch_size == 0 and cfg.mode.startswith("compile") and device.type == "cuda"


def resolve_batch_size(cfg: SFTConfig, model: GPT, world_size: int, device: torch.device,
                       compiled=None) -> tuple[int, str, dict]:
    """device_batch_size from the config, or (0) from the automatic batch size (probe or cache).
    The size is searched eager (a compile per trial size otherwise: the modes compile with
    dynamic=False) and, where probe_compiles, confirmed by one step of `compiled` (compile_sft's
    module, which the training then steps: that one compile serves both)."""
    if cfg.device_batch_size > 0:
        return cfg.device_batch_size, "config", {}
    step = SFTTrialStep(cfg.seq_len, model.config.vocab_size, cfg.mode in PACKED_MODES, world_size)
    dbs, _accum, source, info = resolve(SearchOptions(
        model, build_sft_optimizers, cfg.seq_len, default_total_batch_size(cfg, world_size), world_size, device,
        step_fn=step, compile=probe_compiles(cfg, device), base_dir=cfg.base_dir or None,
        cache_extra={"recipe": "sft", "mode": cfg.mode}, compiled=compiled, compiled_search=False))
    return int(dbs), str(source), dict(info or {})


# -----------------------------------------------------------------------------
# Loss

def summed_loss(model, examples: list[Example], mode: str, batch_size: int, seq_len: int, pad_id: int,
                pack_buffer: int = 512) -> tuple[float, int]:
    """(sum of per-token losses over supervised tokens, number of supervised tokens) over `examples`,
    batched the way `mode` batches them. Independent of batching when the masking is right."""
    lengths = [len(ids) - 1 for ids, _ in examples]
    device = next(model.parameters()).device
    autocast = sft_autocast(device)
    total, count = 0.0, 0
    with torch.no_grad():
        for plan in plan_batches(lengths, mode, batch_size, seq_len, pack_buffer):
            b = batch_for_mode(examples, plan, mode, seq_len, pad_id).to(device)
            with autocast():
                loss = model(b.inputs, b.targets, doc_ids=b.doc_ids, loss_reduction="sum")
            total += float(loss.double())
            count += b.num_supervised
    return total, count


def evaluate(model: GPT, examples: list[Example], batch_size: int, seq_len: int, pad_id: int) -> float | None:
    """Mean loss per supervised token on held-out conversations, with the uncompiled module."""
    if not examples:
        return None
    was_training = model.training
    model.eval()
    total, count = summed_loss(model, examples, "eager-dynamic", batch_size, seq_len, pad_id)
    model.train(was_training)
    return total / count if count else None


# -----------------------------------------------------------------------------
# Checkpoints (nanochat.checkpoint owns the format; the SFT state rides in its meta)

def checkpoint_dir(out_dir: str) -> Path:
    return Path(out_dir) / "checkpoints"


def save_sft_checkpoint(cfg: SFTConfig, model: GPT, tokenizer_dir: str, optimizers, step: int, meta: dict) -> Path:
    """out_dir/checkpoints/step_NNNNNN in nanochat.checkpoint's format, loadable by load_model()."""
    kept = {k: v for k, v in meta.items() if k not in ("path", "step", "python_rng")}
    meta = dict(kept, stage="sft", model_config=model.config.to_dict(), tokenizer_dir=tokenizer_dir,
                sft_config=asdict(cfg), sft_mode=cfg.mode, init_from=cfg.init_from)
    return save_checkpoint(checkpoint_dir(cfg.out_dir), step, model, optimizers, meta)


# -----------------------------------------------------------------------------
# Training

def _all_reduce_sum(values: list[float], device: torch.device, ddp: bool) -> list[float]:
    if not ddp:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def _step_micro_batches(plans: list, first: int, plan_accum: int, rank: int, B: int) -> list:
    """This rank's rows of one optimizer step (its plan_accum planned micro-batches, consecutive in the
    plan), cut into micro-batches of B rows. Rows are independent, so the step's gradient does not depend
    on B: after an out-of-memory fallback the same rows are rerun in smaller pieces, and a restart keeps
    the epoch plan it was made with. Consecutive, so that in the padding modes a rank's rows are the same
    whether the step was planned as 4 rows x 1 or 2 rows x 2 (a fallback equals a run configured small)."""
    rows = [row for k in range(plan_accum) for row in plans[first + rank * plan_accum + k]]
    return [rows[i:i + B] for i in range(0, len(rows), B)]


def plan_epochs(cfg: SFTConfig, train_examples: list[Example], plan: StepGeometry) -> list:
    """Every epoch's micro-batches planned up front with plan.device_batch_size rows each: all ranks
    compute the same plan and take their share of each step, so they agree on the number of steps
    without talking. Each epoch's order comes from the seed and the epoch alone."""
    lengths = [len(ids) - 1 for ids, _ in train_examples]
    plans = []
    for epoch in range(cfg.num_epochs):
        order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(cfg.seed + epoch)).tolist()
        epoch_plans = plan_batches([lengths[i] for i in order], cfg.mode, plan.device_batch_size, plan.seq_len,
                                   cfg.pack_buffer)
        plans += [[[order[i] for i in row] for row in p] for p in epoch_plans]
    return plans


def train(cfg: SFTConfig, model: GPT, tokenizer: Tokenizer, train_examples: list[Example],
          val_examples: list[Example], device_batch_size: int, batch_size_source: str,
          should_stop: Callable[[], bool] | None = None, meta: dict | None = None,
          batch_info: dict | None = None, compiled: tuple | None = None) -> dict:
    """Fine-tune `model` in place and return the result row (a dict of RESULT_COLUMNS and extras).
    batch_info: resolve_batch_size's info (its cache_key and cache_dir receive an out-of-memory fallback).
    compiled: compile_sft(model) when the batch-size probe already stepped it (a compiled mode)."""
    started = time.time()
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    ddp = world > 1
    device = model.get_device()
    batch_info = batch_info or {}
    # This mode's peak only: not the batch-size probe's largest (failed) trial, nor a benchmark's earlier mode.
    reset_peak_memory(device)
    T, mode = cfg.seq_len, cfg.mode
    total = default_total_batch_size(cfg, world) if batch_size_source != "config" else cfg.total_batch_size
    batch = DeviceBatch(StepGeometry.from_total(total, device_batch_size, T, world), batch_size_source,
                        batch_info.get("cache_key"), batch_info.get("cache_dir"))
    pad_id = tokenizer.get_bos_token_id()
    if T > model.rotary_seq_len:
        raise cfg.problem("seq_len", f"longer than the model's rotary table ({model.rotary_seq_len})")

    optimizers = build_optimizers(model, unembedding_lr=cfg.unembedding_lr, embedding_lr=cfg.embedding_lr,
                                  matrix_lr=cfg.matrix_lr, weight_decay=cfg.weight_decay)
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] = group["initial_lr"] * cfg.init_lr_frac
    optimizers[1].shard = cfg.overlap and ddp  # Muon: each rank orthogonalises its share of the matrices
    ckpt = (load_latest_checkpoint(checkpoint_dir(cfg.out_dir), "sft", model, optimizers, device)
            if cfg.save_checkpoint and cfg.out_dir else None)
    start_step, ckpt_meta = (int(ckpt["meta"]["step"]), dict(ckpt["meta"])) if ckpt is not None else (0, {})
    del ckpt

    # The epoch plan is made with the planned device batch (plan); the rows run at once (batch) may be
    # fewer after an out-of-memory fallback. A restart plans as the interrupted attempt did (its
    # checkpoint says how) and keeps a fallback's smaller device batch, as base training does.
    plan = batch.geometry
    saved_plan_B, saved_plan_accum = ckpt_meta.get("plan_batch_size"), ckpt_meta.get("plan_grad_accum")
    if (is_positive_int(saved_plan_B) and is_positive_int(saved_plan_accum)
            and saved_plan_B * saved_plan_accum == plan.rows_per_rank):
        plan = plan.with_device_batch(saved_plan_B)
        if batch.keep_fallback_of(ckpt_meta):
            print0(f"sft[{mode}] keeping the out-of-memory fallback of the interrupted run: "
                   f"device_batch_size={batch.size}, grad_accum={batch.geometry.grad_accum}")
    plans = plan_epochs(cfg, train_examples, plan)
    micro_per_step = plan.grad_accum * world
    num_steps = len(plans) // micro_per_step
    if cfg.max_steps:
        num_steps = min(num_steps, cfg.max_steps)
    if num_steps < 1:
        raise ConfigError(f"sft: {len(train_examples)} conversations make {len(plans)} micro-batches, fewer than "
                          f"one optimizer step needs ({micro_per_step}); add data or lower device_batch_size")

    if mode.startswith("compile"):
        train_model, counter = compiled or compile_sft(model)
    else:
        train_model, counter = model, CompileCounter()
    compiled = mode.startswith("compile")
    autocast = sft_autocast(device)
    model.train()
    # gradients all-reduced in buckets during the last micro-batch's backward (train_loop does the same)
    grad_buckets = GradientBuckets(model) if (cfg.overlap and ddp) else None

    val_loss_before = evaluate(model, val_examples, cfg.eval_batch_size, T, pad_id) if start_step == 0 else None
    step = start_step
    state = "COMPLETED"
    losses: list[float] = []
    metrics_path = Path(cfg.out_dir) / "metrics.csv" if (cfg.out_dir and rank == 0) else None
    metrics = read_metrics(metrics_path, start_step) if metrics_path else []
    t_start = time.time()
    timed = dict(positions=0, real=0, supervised=0, conversations=0)
    warmup_s, timed_start, timed_steps = 0.0, None, 0
    # Each step's batches are built (and pinned on CUDA) one step ahead in a background thread
    # (dataloader.Prefetcher, as StepRows does for base training); overlap: false builds them in turn.
    pin = device.type == "cuda"

    def step_batches(k: int, rows: int) -> list:
        batches = [batch_for_mode(train_examples, m, mode, T, pad_id)
                   for m in _step_micro_batches(plans, k * micro_per_step, plan.grad_accum, rank, rows)]
        return [b.pin_memory() for b in batches] if pin else batches

    upcoming = iter(range(start_step, num_steps))

    def next_step_batches():
        rows = batch.size  # as it is now: the loop rebuilds a step prepared before an out-of-memory fallback
        return rows, step_batches(next(upcoming), rows)

    feed = Prefetcher(next_step_batches, num_steps - start_step, background=cfg.overlap)
    try:
        while step < num_steps:
            synchronize(device)
            t0 = time.time()
            built_with, batches = feed.next()
            if built_with != batch.size:  # prepared before an out-of-memory fallback shrank the micro-batch
                batches = step_batches(step, batch.size)
            # Count the step's supervised tokens over all micro-batches and ranks before any backward.
            n_sup = _all_reduce_sum([float(sum(b.num_supervised for b in batches))], device, ddp)[0]
            scale = world / max(n_sup, 1.0)  # gradients are averaged over ranks, so x world gives sum / n_sup

            def forward_backward(B: int) -> torch.Tensor:
                nonlocal batches
                if B != len(batches[0].inputs) and B != built_with:   # rerun after a fallback: smaller pieces
                    batches = step_batches(step, B)
                loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # stays on the device: no sync
                for i, b in enumerate(batches):
                    if grad_buckets is not None and i == len(batches) - 1:
                        grad_buckets.arm()
                    b = b.to(device)
                    with autocast():
                        loss = train_model(b.inputs, b.targets, doc_ids=b.doc_ids, loss_reduction="sum")
                    (loss * scale).backward()
                    loss_sum += loss.detach()
                return loss_sum

            loss_sum = step_with_oom_retry(forward_backward, batch, model=model, grad_buckets=grad_buckets,
                                           device=device, label=f"sft[{mode}]", step=step)
            if grad_buckets is None:
                all_reduce_gradients(model)
            lr_mult = 1.0 - step / num_steps  # linear decay to zero, as nanochat's SFT
            for opt in optimizers:
                for group in opt.param_groups:
                    group["lr"] = group["initial_lr"] * lr_mult
                opt.step()
            zero_gradients(model, grad_buckets)
            losses.append(_all_reduce_sum([float(loss_sum)], device, ddp)[0] / max(n_sup, 1.0))
            synchronize(device)
            dt = time.time() - t0
            step += 1
            if step - start_step <= cfg.warmup_steps:
                warmup_s += dt
                timed_start = time.time()
            else:
                timed_steps += 1
                for b in batches:
                    timed["positions"] += b.num_positions
                    timed["real"] += b.num_real
                    timed["supervised"] += b.num_supervised
                    timed["conversations"] += b.num_conversations
            if timed_start is None:
                timed_start = t0
            if metrics_path:
                positions = sum(b.num_positions for b in batches) * world
                metrics.append({"step": step, "loss": round(losses[-1], 6), "lrm": round(lr_mult, 6),
                                "tokens_per_s": round(positions / max(dt, 1e-9), 2),
                                "peak_memory_bytes": peak_memory_bytes(device),
                                "elapsed_s": round(time.time() - t_start, 3),
                                "num_steps": num_steps})
                if step % 10 == 0 or step == num_steps:
                    write_metrics(metrics_path, metrics)
            if step % 10 == 0 or step == num_steps:
                print0(f"sft[{mode}] step {step}/{num_steps} loss {losses[-1]:.4f} dt {dt * 1000:.0f}ms")
            # Ranks agree before acting on a stop request (USR2 may reach one rank only, or reach them at
            # different steps): a rank that left the loop alone would leave the others in the next all-reduce.
            if step < num_steps and any_rank(bool(should_stop is not None and should_stop()), device):
                state = "PREEMPTED"
                if metrics_path:
                    write_metrics(metrics_path, metrics)
                break
    finally:
        feed.close()  # the prefetch thread never outlives the loop (end, preemption or error)
    if grad_buckets is not None:
        grad_buckets.remove()
    synchronize(device)
    timed_s = time.time() - timed_start if timed_steps else 0.0

    # Saved before evaluation: on preemption the grace period goes to the checkpoint, and an eval
    # crash never costs the trained weights. A preempted run is evaluated when it resumes and ends.
    ckpt_path = None
    if cfg.save_checkpoint and cfg.out_dir and rank == 0:
        tokenizer_dir = (meta or {}).get("tokenizer_dir") or str(Path(cfg.out_dir) / "tokenizer")
        if not (Path(tokenizer_dir) / "tokenizer.json").exists():
            tokenizer.save(tokenizer_dir)
        batch_meta = dict(device_batch_size=batch.size, grad_accum_steps=batch.geometry.grad_accum,
                          batch_size_source=batch.source, plan_batch_size=plan.device_batch_size,
                          plan_grad_accum=plan.grad_accum)
        ckpt_path = str(save_sft_checkpoint(cfg, model, tokenizer_dir, optimizers, step,
                                            dict(meta or {}, **batch_meta)))
    if ddp:
        dist.barrier()
    model.eval()
    val_loss = evaluate(model, val_examples, cfg.eval_batch_size, T, pad_id) if state == "COMPLETED" else None

    counts = _all_reduce_sum([timed["positions"], timed["real"], timed["supervised"], timed["conversations"]],
                             device, ddp)
    positions, real, supervised, conversations = counts
    rate = (lambda x: x / timed_s) if timed_s > 0 else (lambda x: None)
    tokens_per_s = rate(positions)
    mean_step_s = timed_s / timed_steps if timed_steps else None
    # What the warm-up cost beyond ordinary steps: compilation, mostly (the whole warm-up if nothing was timed).
    compile_s = 0.0
    if compiled:
        compile_s = max(0.0, warmup_s - cfg.warmup_steps * mean_step_s) if mean_step_s else warmup_s
    peaks = device_peaks(device, cfg.peak_flops)
    geometry = batch.geometry
    return {
        "kind": "sft", "variant": mode, "state": state,
        "device_name": device_name(device), "world_size": world,
        "depth": model.config.n_layer, "n_params": model.num_params(), "seq_len": T,
        "device_batch_size": geometry.device_batch_size, "batch_size_source": batch.source,
        "total_batch_size": geometry.total_batch_size, "grad_accum_steps": geometry.grad_accum,
        "steps": step - start_step,
        "tokens_per_s": tokens_per_s, "real_tokens_per_s": rate(real), "supervised_tokens_per_s": rate(supervised),
        "padding_fraction": (1 - real / positions) if positions else None,
        "mfu": (mfu_percent(model.estimate_flops(), tokens_per_s, device, world, cfg.peak_flops)
                if tokens_per_s else None),
        "peak_memory_bytes": peak_memory_bytes(device),
        "peak_flops": peaks["peak_flops"], "peak_flops_source": peaks["peak_flops_source"],
        "compile": compiled, "num_compiles": counter.count if compiled else 0,
        "final_loss": losses[-1] if losses else None,
        "wall_time_s": time.time() - started, "git_commit": git_commit(),
        "extra": {
            "val_loss": val_loss, "val_loss_before": val_loss_before,
            "first_loss": losses[0] if losses else None,
            "warmup_seconds": warmup_s,
            "compile_seconds": compile_s,
            "timed_seconds": timed_s, "timed_steps": timed_steps,
            "conversations_per_s": rate(conversations),
            "attention": (ATTENTION_NAMES[doc_attention_route(model.doc_attention, device)]
                          if mode in PACKED_MODES else "sdpa-causal"),
            "num_steps_planned": num_steps, "resumed_from_step": start_step,
            "checkpoint": ckpt_path,
        },
    }

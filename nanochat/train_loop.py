"""
The training loop shared by base and mid training (nanochat's recipe):
- Muon for the block matrices + AdamW for embedding and lm_head (nanochat.optim.build_optimizers)
- LR: no warmup, constant, then linear warmdown over the last `warmdown_ratio` of the steps;
  Muon momentum warms up 0.85 -> 0.95 over the first 300 steps
- gradient accumulation to an exact total batch in tokens:
  total_batch_size == device_batch_size * seq_len * world_size * grad_accum_steps
- bf16 autocast and torch.compile (by region: gpt.CompiledGPT) on CUDA; fp32 on CPU, compiled only
  for runs long enough to pay the compile back (resolve_compile), unless asked (precision: fast takes
  bf16 autocast on CPUs with AMX)
- torch.distributed from the environment; gradients averaged in buckets while backward runs
  (optim.GradientBuckets), Muon's Newton-Schulz split over the ranks (Muon.shard), the next step's
  rows prepared in a background thread (dataloader.StepRows); overlap: false is the plain path
  (one flat all-reduce after backward, every rank orthogonalises every matrix, rows read in turn)
- each optimizer step's data is fetched whole (rows of tokens) and sliced into micro-batches,
  so on an out-of-memory error the same step can be rerun with half the device batch
- metrics.csv, checkpoints (resume from the newest valid one), val bits per byte
"""
from __future__ import annotations

import contextlib
import csv
import functools
import io
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from nanochat.checkpoint import check_model_config, latest_valid_checkpoint, save_checkpoint, set_rng_state
from nanochat.device import device_name, peak_memory_bytes, reset_peak_memory, synchronize
from nanochat.distributed import DistInfo, print0
from nanochat.errors import ConfigError
from nanochat.files import atomic_write_text
from nanochat.peaks import device_peaks
from nanochat.dataloader import StepRows
from nanochat.gpt import CompiledGPT
from nanochat.optim import GradientBuckets, all_reduce_gradients, build_optimizers, zero_gradients

# num_steps: the steps this stage runs in all (SFT knows it only once its data is planned)
METRICS_COLUMNS = ["step", "loss", "lrm", "tokens_per_s", "mfu", "peak_memory_bytes", "elapsed_s", "val_bpb", "num_steps"]
COMPILE_CHOICES = {"auto": None, "on": True, "true": True, "1": True, "off": False, "false": False, "0": False}


@dataclass
class TrainConfig:
    """Fields common to base and mid training. Every field is a YAML key of the stage."""
    base_dir: str = ""                 # shared artifacts; "" -> nanochat.files.get_base_dir()
    out_dir: str = ""                  # this stage's folder: checkpoints/, metrics.csv
    init_from: str = ""                # checkpoint folder to start from (mid training)
    device_type: str = ""              # "" = cuda if available, else cpu
    seq_len: int = 256                 # tokens per row
    device_batch_size: int = 0         # rows per forward/backward on one device; 0 = automatic
    total_batch_size: int = 0          # tokens per optimizer step over all ranks; 0 = one micro-batch per rank
    num_steps: int = 0                 # optimizer steps; 0 = from target_param_data_ratio
    target_param_data_ratio: float = 20.0  # tokens / parameters (Chinchilla) when num_steps is 0
    matrix_lr: float = 0.02            # Muon
    embedding_lr: float = 0.2          # AdamW, token embedding
    unembedding_lr: float = 0.004      # AdamW, lm_head
    weight_decay: float = 0.0
    warmdown_ratio: float = 0.2        # share of the steps over which the LR decays linearly
    final_lr_frac: float = 0.0         # LR multiplier at the last step
    eval_every: int = 0                # val bpb every N steps (0: only at the end); always at the end
    eval_tokens: int = 32768           # tokens per val bpb evaluation (all ranks)
    save_every: int = 0                # checkpoint every N steps (0: only at the end / on stop)
    keep_checkpoints: int = 2          # step folders kept
    log_every: int = 10                # metrics.csv row every N steps (and the last step)
    compile: str = "auto"              # auto (on for cuda; on a cpu for long runs: resolve_compile) | on | off
    precision: str = "auto"            # auto | fast | fp32 | bf16: matmul precision (train_precision_route)
    seed: int = 42
    num_streams: int = 0               # data streams; 0 = world_size (see dataloader.py)
    overlap: bool = True               # prefetch rows, all-reduce during backward, shard Muon; false = plain path
    peak_flops: float = 0.0            # bf16 dense FLOP/s of one device for MFU; 0 = peaks.device_peaks' table/fallback


def validate_common(cfg: TrainConfig) -> None:
    name = type(cfg).__name__
    for key in ("seq_len",):
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"{name}.{key}={getattr(cfg, key)}: must be positive")
    for key in ("device_batch_size", "total_batch_size", "num_steps", "eval_every", "save_every", "num_streams"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"{name}.{key}={getattr(cfg, key)}: must be >= 0")
    if cfg.log_every <= 0:
        raise ConfigError(f"{name}.log_every={cfg.log_every}: must be positive")
    if cfg.peak_flops < 0:
        raise ConfigError(f"{name}.peak_flops={cfg.peak_flops}: must be >= 0 (0: the peak table or the CUDA properties)")
    if cfg.keep_checkpoints < 1:
        raise ConfigError(f"{name}.keep_checkpoints={cfg.keep_checkpoints}: must be >= 1")
    if not 0.0 <= cfg.warmdown_ratio <= 1.0:
        raise ConfigError(f"{name}.warmdown_ratio={cfg.warmdown_ratio}: must be in [0, 1]")
    if cfg.precision not in PRECISION_CHOICES:
        raise ConfigError(f"{name}.precision={cfg.precision!r}: expected one of {', '.join(PRECISION_CHOICES)}")
    if str(cfg.compile).lower() not in COMPILE_CHOICES:
        raise ConfigError(f"{name}.compile={cfg.compile!r}: expected one of auto, on, off")
    if not isinstance(cfg.overlap, bool):
        raise ConfigError(f"{name}.overlap={cfg.overlap!r}: expected true or false")
    if cfg.device_type not in ("", "cpu", "cuda", "mps"):
        raise ConfigError(f"{name}.device_type={cfg.device_type!r}: expected '', cpu, cuda or mps")


def config_from_dict(cls, d: dict, source: str = "config"):
    """Build a config dataclass from a dict, naming an unknown key."""
    known = {f.name for f in fields(cls)}
    for key in d:
        if key not in known:
            raise ConfigError(f"{source}: unknown key {key!r} for {cls.__name__}")
    return cls(**d)


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


def mfu_percent(flops_per_token: float, tokens_per_s: float, device: torch.device, world_size: int,
                peak_flops: float = 0.0) -> float | None:
    """Model FLOPs utilisation in percent against peaks.device_peaks (peak_flops: a user-given peak)."""
    peak = device_peaks(device, peak_flops)["peak_flops"]
    if not peak:
        return None
    return flops_per_token * tokens_per_s / (peak * world_size) * 100


def num_compiles() -> int:
    try:
        from torch._dynamo.utils import counters
        return int(counters["stats"]["unique_graphs"])
    except Exception:
        return 0


def _oom_handlers():
    """(is_oom_error, fallback_after_oom) from nanochat.auto_batch_size, or None if it is absent."""
    try:
        from nanochat.auto_batch_size import fallback_after_oom, is_oom_error
    except ImportError:
        return None
    return is_oom_error, fallback_after_oom


# -----------------------------------------------------------------------------
# Batch size

# batch_size_source after a run-time out-of-memory fallback. A configured (fixed) batch stays the
# fixed side of the report's auto-vs-fixed comparison: it is marked, never counted as found.
OOM_FALLBACK_SOURCES = ("fallback", "config+oom_fallback")


def source_after_oom(source: str) -> str:
    return "config+oom_fallback" if source in ("config", "config+oom_fallback") else "fallback"


# auto: bf16 autocast on CUDA, fp32 on a CPU (the CPU run is the exact reference the tests and smoke
# runs compare against). fast: bf16 autocast where it makes a training step faster: CUDA, CPUs with
# AMX (nanochat.cpu_features.cpu_has_amx), and CPUs with AVX512-BF16 when the step is compiled (inductor
# fuses the casts into the kernels around the matmuls: 2.06x fp32 eager on an idle 2-core AMD EPYC,
# depth 4, 8 x 512, bench train --compare-cpu-step); fp32 on other CPUs and on an eager step there: eager,
# the casts cost more than the bf16 matmuls save (measured 0.53x), and without the instructions bf16 is
# emulated. fp32 / bf16: as said, anywhere. Weights, gradients and optimizer state stay fp32 in every case.
PRECISION_CHOICES = ("auto", "fast", "fp32", "bf16")


def train_precision_route(choice: str, device: torch.device, compiled: bool = False) -> str:
    """"bf16" (autocast) or "fp32" for `choice` on `device`; `compiled`: the step is torch.compile'd."""
    from nanochat.cpu_features import cpu_has_amx, cpu_has_fast_bf16
    if choice not in PRECISION_CHOICES:
        raise ValueError(f"precision {choice!r}: choose one of {', '.join(PRECISION_CHOICES)}")
    if choice in ("fp32", "bf16"):
        return choice
    if device.type == "cuda":
        return "bf16"
    if choice == "fast" and device.type == "cpu" and (cpu_has_amx() or (compiled and cpu_has_fast_bf16())):
        return "bf16"
    return "fp32"


def autocast_context(precision: str, device: torch.device):
    """A zero-argument factory of the autocast context for a routed precision."""
    if precision == "bf16":
        return lambda: torch.amp.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


# compile: auto on a CPU. Inductor's CPU code fuses the elementwise work around the matmuls (rotary,
# norms, relu^2, softcap, cross-entropy and their backward) that eager runs as separate memory-bound
# passes. Measured on an idle 2-core AMD EPYC (AVX512-BF16, no AMX), 8 x 512 tokens, fp32, bench train
# --compare-cpu-step: the compiled step ran 1.27x the eager one at depth 4 and 1.13x at depth 8, after a
# first step that compiled for 28-34 s (cold cache): paid back after 124 steps (1.6e13 training FLOPs)
# and 35 steps (2.7e13). So auto turns it on only for a run with about twice that work ahead (train
# FLOPs = steps x tokens per step per rank x flops per token), and only where inductor can generate
# vector code (cpu_features.cpu_can_compile). Compile time and step time are both CPU-bound, so a
# threshold in FLOPs carries over to faster CPUs: payback work = compile s x eager FLOP/s / (1 - 1/speedup).
CPU_COMPILE_MIN_TRAIN_FLOPS = 5e13


def resolve_compile(setting, device: torch.device, train_flops: float | None = None) -> bool:
    """compile: auto | on | off (a bool also works). auto: on for cuda; on a CPU only when train_flops
    (this rank's training work, known once the step count and batch are) reaches
    CPU_COMPILE_MIN_TRAIN_FLOPS and inductor can build CPU code; off elsewhere and whenever train_flops
    is not given (the batch-size search, which runs eager on a CPU anyway)."""
    from nanochat.cpu_features import cpu_can_compile
    flag = COMPILE_CHOICES[str(setting).lower()]
    if flag is not None:
        return flag
    if device.type == "cuda":
        return True
    return (device.type == "cpu" and train_flops is not None and train_flops >= CPU_COMPILE_MIN_TRAIN_FLOPS
            and cpu_can_compile())


def compile_model(model, backend=None, dynamic: bool | None = None):
    """THE compile of base and mid training (and of the batch-size probe that serves them, so the
    graphs it builds are the ones training runs): by region (gpt.CompiledGPT), so gradient buckets
    overlap backward. dynamic None, dynamo's default: a graph for the first batch size, then one with
    a symbolic batch size for every other (the probe's trial sizes, an out-of-memory fallback's smaller
    micro-batch) instead of a compile per size; a run at one size compiles once, as with dynamic=False."""
    return CompiledGPT(model, backend=backend, dynamic=dynamic)


def auto_batch_options(model, seq_len: int, total_batch_size: int, world_size: int, device: torch.device,
                       compile_setting, precision: str = "auto") -> dict:
    """The arguments (and so the cache key) of the automatic device batch size for a base or mid
    training run: THE one place they are derived. The training loop and the probe stage that serves
    it both call this, so the entry a probe writes is the entry training reads. build_optimizers
    itself: optimizer memory does not depend on the learning rates; the trial steps run under the
    training's own autocast (bf16 activations take half the memory of fp32 ones). The step count is not
    known here, so on a CPU compile auto and precision fast are keyed as the eager fp32 step (the search
    runs eager there anyway; a compiled or bf16 step usually takes less memory)."""
    autocast = "bfloat16" if train_precision_route(precision, device) == "bf16" else None
    return dict(model=model, optimizers_factory=build_optimizers, seq_len=seq_len, total_batch_size=total_batch_size,
                world_size=world_size, device=device, compile=resolve_compile(compile_setting, device),
                vocab_size=model.config.vocab_size, autocast_dtype=autocast)


def batch_cache_key(cfg: TrainConfig, model, world_size: int, device: torch.device) -> str:
    """The batch-size cache key this training config looks up (model may live on the meta device)."""
    from nanochat.auto_batch_size import key_inputs
    return key_inputs(**auto_batch_options(model, cfg.seq_len, cfg.total_batch_size, world_size, device, cfg.compile,
                                         cfg.precision)).key


def resolve_batch(cfg: TrainConfig, model, world_size: int, device: torch.device,
                  compiled=None) -> tuple[int, int, str, int, dict]:
    """-> (device_batch_size, grad_accum_steps, batch_size_source, total_batch_size, info).
    compiled: the module training will step (compile on): the probe's compiled trials step it."""
    name = type(cfg).__name__
    T = cfg.seq_len
    if cfg.device_batch_size == 0:
        try:
            from nanochat.auto_batch_size import resolve_device_batch_size
        except ImportError:
            raise ConfigError(f"{name}.device_batch_size=0 (automatic) needs nanochat.auto_batch_size, "
                              f"which is not available; set device_batch_size") from None
        if cfg.total_batch_size <= 0:
            raise ConfigError(f"{name}.total_batch_size must be set (tokens per step) when device_batch_size=0")
        B, accum, source, info = resolve_device_batch_size(
            **auto_batch_options(model, T, cfg.total_batch_size, world_size, device, cfg.compile, cfg.precision),
            base_dir=cfg.base_dir or None, compiled=compiled)
        total = cfg.total_batch_size
    else:
        B, source, info = cfg.device_batch_size, "config", {}
        total = cfg.total_batch_size or B * T * world_size
        per_micro = B * T * world_size
        if total % per_micro:
            raise ConfigError(f"{name}.total_batch_size={total} is not a multiple of device_batch_size*seq_len*"
                              f"world_size = {B}*{T}*{world_size} = {per_micro}")
        accum = total // per_micro
    if B * T * world_size * accum != total:
        raise ConfigError(f"{name}.total_batch_size={total} != device_batch_size*seq_len*world_size*grad_accum "
                          f"= {B}*{T}*{world_size}*{accum}")
    return B, accum, source, total, info


# -----------------------------------------------------------------------------
# One optimizer step's forward/backward, and evaluation

def forward_backward(model, rows: torch.Tensor, mask: torch.Tensor, B: int, device, autocast_ctx,
                     grad_buckets: GradientBuckets | None = None) -> torch.Tensor:
    """Accumulate gradients for this rank's rows of one optimizer step, in micro-batches of B rows.
    The loss is the sum over supervised targets divided by their count on this rank: the gradient
    is the same whatever B is, so the step can be re-split (OOM fallback) without changing it.
    grad_buckets is armed before the last micro-batch: only its backward launches communication."""
    from nanochat.dataloader import rows_to_batch
    n_valid = max(int(mask[:, 1:].sum()), 1)
    total = torch.zeros((), device=device)
    for i in range(0, rows.size(0), B):
        x, y = rows_to_batch(rows[i:i + B], mask[i:i + B], device)
        if grad_buckets is not None and i + B >= rows.size(0):
            grad_buckets.arm()
        with autocast_ctx():
            loss = model(x, y, loss_reduction="sum") / n_valid
        loss.backward()
        total += loss.detach()
    return total


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


def write_metrics(path: Path, rows: list[dict]) -> None:
    """The stage's metrics.csv (METRICS_COLUMNS), rewritten atomically with every row so far."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=METRICS_COLUMNS)
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in METRICS_COLUMNS})
    atomic_write_text(path, buf.getvalue())


def read_metrics(path: Path, before_step: int) -> list[dict]:
    """Rows of an earlier attempt up to `before_step` (a resumed run continues the same file)."""
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [r for r in csv.DictReader(f) if r.get("step", "").isdigit() and int(r["step"]) <= before_step]


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


def _any_rank(flag: bool, ddp: bool, device) -> bool:
    if not ddp:
        return flag
    t = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


# -----------------------------------------------------------------------------
# The loop

def train(cfg: TrainConfig, *, stage: str, model, tokenizer, tokenizer_dir: str, dist_info: DistInfo,
          make_train_loader: Callable, make_val_loader: Callable, should_stop: Callable[[], bool] | None = None,
          extra_meta: dict | None = None) -> dict:
    """Train `model` (built and initialised by the caller) and return result-row columns.
    make_train_loader(rank, world_size, num_streams) / make_val_loader(rank, world_size, num_streams) -> RankLoader."""
    validate_common(cfg)
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
    probe_compiled = compile_model(model) if cfg.device_batch_size == 0 and resolve_compile(cfg.compile, device) else None
    B, grad_accum, batch_source, total_batch, batch_info = resolve_batch(cfg, model, world_size, device, probe_compiled)
    reset_peak_memory(device)  # the probe's largest (failed) trial is not this stage's peak
    T = cfg.seq_len
    rows_per_rank = B * grad_accum
    n_params = model.num_params()
    num_steps = cfg.num_steps or max(1, int(cfg.target_param_data_ratio * n_params // total_batch))
    optimizers = opt_factory(model)
    optimizers[1].shard = cfg.overlap and ddp  # Muon: each rank orthogonalises its share of the matrices
    train_loader = make_train_loader(rank, world_size, cfg.num_streams)

    # Resume from the newest valid checkpoint of this stage, if any.
    start_step = 0
    resumed_loss = None
    model_config = model.config.to_dict()
    if ckpt_root is not None:
        ckpt = latest_valid_checkpoint(ckpt_root, device)
        if ckpt is not None:
            check_model_config(ckpt["path"], ckpt["meta"]["model_config"], model_config)
            try:
                model.load_state_dict(ckpt["model"])
                for opt, sd in zip(optimizers, ckpt["optim"]):
                    opt.load_state_dict(sd)
            except (RuntimeError, ValueError, KeyError) as e:
                raise ConfigError(f"{ckpt['path']}: checkpoint does not fit this model ({str(e)[:200]})") from None
            train_loader.load_state_dict(ckpt["meta"]["loader"])
            set_rng_state(ckpt["rng"], ckpt["meta"].get("python_rng"), device)
            start_step = int(ckpt["meta"]["step"])
            resumed_loss = ckpt["meta"].get("loss")
            # an out-of-memory fallback before the restart: keep its smaller batch (same rows per step)
            m = ckpt["meta"]
            if (m.get("batch_size_source") in OOM_FALLBACK_SOURCES and m.get("device_batch_size", B) < B
                    and m["device_batch_size"] * m.get("grad_accum_steps", 0) == rows_per_rank):
                B, grad_accum, batch_source = m["device_batch_size"], m["grad_accum_steps"], source_after_oom(batch_source)
            print0(f"[{stage}] resumed from {ckpt['path']} at step {start_step}")
            del ckpt

    use_compile = resolve_compile(cfg.compile, device,
                                  train_flops=(num_steps - start_step) * rows_per_rank * T * model.estimate_flops())
    precision = train_precision_route(cfg.precision, device, compiled=use_compile)  # bf16 pays on some CPUs only compiled
    autocast_ctx = autocast_context(precision, device)
    train_model = (probe_compiled or compile_model(model)) if use_compile else model  # by region: buckets overlap backward
    flops_per_token = model.estimate_flops()
    token_bytes = tokenizer.token_bytes()
    oom_handlers = _oom_handlers()
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
                    "loader": loader_state, "tokenizer_dir": str(tokenizer_dir), "device_batch_size": B,
                    "grad_accum_steps": grad_accum, "batch_size_source": batch_source,
                    "total_batch_size": total_batch, "num_steps": num_steps, "world_size": world_size,
                    "loss": loss_value, **(extra_meta or {})}
            save_checkpoint(ckpt_root, step_done, model, optimizers, meta, keep=cfg.keep_checkpoints)
        if ddp:
            dist.barrier()

    def run_eval() -> float:
        # Validation is read with the same streams as training, so its rows too are independent
        # of the world size. B as it is now (an OOM fallback shrinks it), a multiple of the streams.
        val_loader = make_val_loader(rank, world_size, cfg.num_streams)
        k = len(val_loader.streams)
        eval_B = max(B - B % k, k)
        eval_steps = max(1, cfg.eval_tokens // (eval_B * T * world_size))
        return evaluate_bpb(model, val_loader, eval_steps, eval_B, token_bytes, device, autocast_ctx)

    print0(f"[{stage}] params={n_params:,} steps={num_steps} B={B} T={T} world={world_size} "
           f"grad_accum={grad_accum} total_batch={total_batch} ({batch_source}) compile={use_compile}")
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
            while True:
                out_of_memory = False
                try:
                    loss = forward_backward(train_model, rows, mask, B, device, autocast_ctx, grad_buckets)
                except Exception as exc:  # only out-of-memory errors are handled; anything else re-raises
                    if oom_handlers is None or not oom_handlers[0](exc) or B == 1:
                        raise
                    out_of_memory = True
                    del exc
                if grad_buckets is not None:
                    grad_buckets.launch_rest()  # every rank's bucket collectives pair up, even after an OOM
                if ddp:
                    # Every rank learns whether any rank ran out of memory before anyone enters the
                    # gradient all-reduce, so one rank's OOM cannot leave the others waiting there.
                    flag = torch.tensor([1.0 if out_of_memory else 0.0], device=device)
                    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                    out_of_memory = bool(flag.item())
                if grad_buckets is not None:
                    grad_buckets.finish(apply=not out_of_memory)  # the averaged gradients, or dropped for the rerun
                if not out_of_memory:
                    break
                # Drop this step's partial gradients and rerun the same rows in smaller micro-batches.
                zero_gradients(model, grad_buckets)
                B, grad_accum = oom_handlers[1](B, grad_accum, batch_info.get("cache_key"),
                                                batch_info.get("cache_dir"), device)
                batch_source = source_after_oom(batch_source)
                reset_peak_memory(device)   # the failed attempt filled the device: not the peak of the size kept
                print0(f"[{stage}] out of memory at step {step}: rerunning it with device_batch_size={B}, "
                       f"grad_accum={grad_accum}")
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

            stop = _any_rank(bool(should_stop and should_stop()), ddp, device)
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
        "stage_kind": stage, "n_params": n_params, "seq_len": T, "device_batch_size": B,
        "batch_size_source": batch_source, "total_batch_size": total_batch, "grad_accum_steps": grad_accum,
        "steps": step - start_step, "start_step": start_step, "step": step, "num_steps": num_steps,
        "tokens_per_s": tokens_per_s, "real_tokens_per_s": tokens_per_s,
        "mfu": mfu_percent(flops_per_token, tokens_per_s, device, world_size, cfg.peak_flops) if tokens_per_s else None,
        **{k: v for k, v in device_peaks(device, cfg.peak_flops).items() if k.startswith("peak_flops")},
        "peak_memory_bytes": peak_memory_bytes(device), "compile": use_compile,
        "num_compiles": num_compiles() - compiles_before, "final_loss": loss_value, "val_bpb": val_bpb,
        "device_name": device_name(device), "world_size": world_size, "state": state,
        "flops_per_token": flops_per_token, "batch_info": batch_info or None,
    }

"""
The probe stage: find (or read from the cache) the device batch size of one training shape and write
the cache entry its training stage reads (nanochat.training.batch_size). With `serves`, jobs derives the
shape keys (SERVED_KEYS) from the training stage the probe serves, so the key is the one it looks up.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from nanochat.training.batch_size.options import DEFAULT_SAFETY_MARGIN, DEFAULT_STOP_GAIN, SearchOptions
from nanochat.training.batch_size.resolve import key_inputs, resolve, training_options
from nanochat.device import autodetect_device_type, device_name, peak_memory_bytes
from nanochat.errors import ConfigError
from nanochat.files import atomic_write_json
from nanochat.gpt import GPTConfig, build_model
from nanochat.training.routes import COMPILE_CHOICES, PRECISION_CHOICES


@dataclass
class ProbeConfig:
    base_dir: str = ""
    out_dir: str = ""
    serves: str = ""                    # the training stage this probe fills the cache for: in a pipeline,
                                        # jobs derives every shape key below from that stage (jobs.stages)
    init_from: str = ""                 # a checkpoint folder: probe that model instead of a fresh one
    device_type: str = ""
    depth: int = 4
    seq_len: int = 512
    vocab_size: int = 4096
    total_batch_size: int = 0           # tokens per optimizer step; 0 = seq_len * world_size * 64
    world_size: int = 1                 # ranks the training will use (the probe itself runs on one)
    compile: bool | str = "off"         # as the training stage's: auto (on for cuda) | on | off
    precision: str = "auto"             # as the training stage's (training.routes): autocast changes memory
    memory_budget_gb: float = 0.0       # CPU only; 0 = half the total memory
    safety_margin: float = DEFAULT_SAFETY_MARGIN
    stop_gain: float = DEFAULT_STOP_GAIN  # < 0 disables the speed check
    time_limit_s: float = 0.0           # stop searching after this long, keep the best size (0: none;
                                        # in a pipeline: from the stage's time_min)
    use_cache: bool = True
    refresh_cache: bool = False
    cache_dir: str = ""


# The ProbeConfig keys a probe with `serves` takes from the training stage it serves.
SERVED_KEYS = ("init_from", "device_type", "depth", "seq_len", "vocab_size", "total_batch_size", "world_size",
               "compile", "precision")


def validate_probe_config(cfg: ProbeConfig) -> None:
    if cfg.precision not in PRECISION_CHOICES:
        raise ConfigError(f"probe.precision: expected one of {', '.join(PRECISION_CHOICES)}, got {cfg.precision!r}")
    for name in ("depth", "seq_len", "vocab_size", "world_size"):
        if int(getattr(cfg, name)) < 1:
            raise ConfigError(f"probe.{name}: must be a positive integer, got {getattr(cfg, name)!r}")
    if not 0.0 <= cfg.safety_margin < 1.0:
        raise ConfigError(f"probe.safety_margin: must be in [0, 1), got {cfg.safety_margin}")
    if cfg.memory_budget_gb < 0:
        raise ConfigError(f"probe.memory_budget_gb: must be >= 0, got {cfg.memory_budget_gb}")
    if cfg.time_limit_s < 0:
        raise ConfigError(f"probe.time_limit_s: must be >= 0, got {cfg.time_limit_s}")
    if cfg.device_type not in ("", "cpu", "cuda", "mps"):
        raise ConfigError(f"probe.device_type: unknown device {cfg.device_type!r}")
    if str(cfg.compile).lower() not in COMPILE_CHOICES:
        raise ConfigError(f"probe.compile: expected auto, on or off, got {cfg.compile!r}")


def probe_total_batch_size(cfg: ProbeConfig) -> int:
    return cfg.total_batch_size or cfg.seq_len * cfg.world_size * 64


def probe_model(cfg: ProbeConfig, device: torch.device):
    """The model the probe trials: the checkpoint's, or a fresh one of the training's shape built as
    base training builds it (on the meta device it costs no memory: enough for the cache key)."""
    if cfg.init_from:
        from nanochat.checkpoint import load_model  # the checkpoint module owns the folder format
        model, _tokenizer, _meta = load_model(cfg.init_from, device)
        return model
    return build_model(GPTConfig.from_depth(cfg.depth, cfg.vocab_size, cfg.seq_len), device)


def probe_options(cfg: ProbeConfig, model, device: torch.device) -> SearchOptions:
    """The search options of this probe: the training's (training_options), plus the probe's own
    search policy and cache settings (which the key does not depend on)."""
    training = training_options(model, cfg.seq_len, probe_total_batch_size(cfg), cfg.world_size, device,
                                cfg.compile, cfg.precision)
    return replace(training, safety_margin=cfg.safety_margin,
                   stop_gain=(cfg.stop_gain if cfg.stop_gain >= 0 else None),
                   memory_budget_gb=(cfg.memory_budget_gb or None), use_cache=cfg.use_cache,
                   refresh_cache=cfg.refresh_cache, cache_dir=(cfg.cache_dir or None),
                   base_dir=(cfg.base_dir or None), time_limit_s=(cfg.time_limit_s or None))


def probe_cache_key(cfg: ProbeConfig, device: torch.device | str | None = None, model=None) -> str:
    """The key the probe writes (no trial runs; the model is built on the meta device unless given)."""
    validate_probe_config(cfg)
    device = torch.device(device or cfg.device_type or autodetect_device_type())
    model = model if model is not None else probe_model(cfg, torch.device("meta"))
    return key_inputs(probe_options(cfg, model, device)).key


def run(cfg: ProbeConfig, should_stop=None) -> dict:
    """Probe (or read from the cache) the device batch size for one model shape; returns a result row."""
    validate_probe_config(cfg)
    t0 = time.perf_counter()
    device_type = cfg.device_type or autodetect_device_type()
    device = torch.device(device_type)
    model = probe_model(cfg, device)  # random init: memory does not depend on the weights
    opts = probe_options(cfg, model, device)
    total, use_compile = opts.total_batch_size, opts.compile
    bs, accum, source, info = resolve(opts)
    row = dict(
        kind="probe", state="COMPLETED", device_name=device_name(device), world_size=cfg.world_size,
        depth=model.config.n_layer, n_params=model.num_params(), seq_len=cfg.seq_len,
        device_batch_size=bs, batch_size_source=source, total_batch_size=total, grad_accum_steps=accum,
        compile=use_compile, peak_memory_bytes=peak_memory_bytes(device),
        wall_time_s=time.perf_counter() - t0,
        max_found=info.get("max_found"), first_failure=info.get("first_failure"),
        trials=info.get("trials", []), seconds=info.get("seconds"), cache_key=info["cache_key"],
        memory_budget_gb=info.get("memory_budget_gb"), stopped_by_speed=info.get("stopped_by_speed"),
        stopped_by_deadline=info.get("stopped_by_deadline"), compile_confirmed=info.get("compile_confirmed"),
        baseline_batch_size=info.get("baseline"), speed=info.get("speed"), serves=cfg.serves or None,
    )
    if cfg.out_dir:
        atomic_write_json(Path(cfg.out_dir) / "probe.json", row)
    return row

"""
Resume: a training stage restarted (preempted, requeued, failed and resubmitted) goes on from the newest
valid checkpoint in its out_dir/checkpoints, as base/mid training and SFT all do.
"""
from __future__ import annotations

from pathlib import Path

from nanochat.checkpoint import check_model_config, latest_valid_checkpoint
from nanochat.errors import ConfigError


def load_latest_checkpoint(ckpt_root: str | Path | None, stage: str, model, optimizers, device) -> dict | None:
    """The newest valid checkpoint in ckpt_root, loaded into `model` and `optimizers`: its dict (meta,
    path, rng, ...), or None when there is none or the newest is another stage's. A checkpoint of
    another model shape, or whose state does not load into this one, is a ConfigError naming it."""
    if ckpt_root is None:
        return None
    ckpt = latest_valid_checkpoint(ckpt_root, device)
    if ckpt is None or ckpt["meta"].get("stage") != stage:
        return None
    check_model_config(ckpt["path"], ckpt["meta"]["model_config"], model.config.to_dict())
    try:
        model.load_state_dict(ckpt["model"])
        for opt, state in zip(optimizers, ckpt.get("optim") or []):
            opt.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError) as e:
        raise ConfigError(f"{ckpt['path']}: checkpoint does not fit this model ({str(e)[:200]})") from None
    return ckpt

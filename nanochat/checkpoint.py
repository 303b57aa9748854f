"""
Checkpoints: one folder per step, <ckpt_root>/step_NNNNNN/ with
  model.pt   model state dict            optim.pt  [state dict of each optimizer]
  rng.pt     torch cpu (+ cuda) RNG      meta.json step, model config, training config, loader
                                         positions, python RNG state, tokenizer dir
The folder is written under a temporary name and renamed into place, so a crash leaves either no
step folder or a whole one. Everything tensor-valued is read back with torch.load(weights_only=True).
"""
from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from pathlib import Path

import torch

from nanochat.errors import ConfigError
from nanochat.gpt import GPTConfig, build_model

STEP_PREFIX = "step_"


def step_dir(ckpt_root: str | os.PathLike, step: int) -> Path:
    return Path(ckpt_root) / f"{STEP_PREFIX}{step:06d}"


def list_checkpoints(ckpt_root: str | os.PathLike) -> list[Path]:
    """Step folders, oldest first (temporary folders start with a dot and are ignored)."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX) and p.name[len(STEP_PREFIX):].isdigit()]
    return sorted(dirs, key=lambda p: int(p.name[len(STEP_PREFIX):]))


def rng_state(device: torch.device) -> tuple[dict, list]:
    tensors = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        tensors["cuda"] = torch.cuda.get_rng_state(device)
    version, internal, gauss = random.getstate()
    return tensors, [version, list(internal), gauss]


def set_rng_state(tensors: dict, python_state, device: torch.device) -> None:
    torch.set_rng_state(tensors["cpu"])
    if device.type == "cuda" and "cuda" in tensors:
        torch.cuda.set_rng_state(tensors["cuda"], device)
    if python_state is not None:
        version, internal, gauss = python_state
        random.setstate((version, tuple(internal), gauss))


def save_checkpoint(ckpt_root: str | os.PathLike, step: int, model, optimizers, meta: dict, keep: int = 2) -> Path:
    """Write step folder atomically, then keep only the newest `keep` step folders."""
    root = Path(ckpt_root)
    root.mkdir(parents=True, exist_ok=True)
    final = step_dir(root, step)
    tmp = root / f".tmp_{final.name}_{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    device = next(model.parameters()).device
    tensors, py_state = rng_state(device)
    torch.save(model.state_dict(), tmp / "model.pt")
    torch.save([opt.state_dict() for opt in optimizers], tmp / "optim.pt")
    torch.save(tensors, tmp / "rng.pt")
    (tmp / "meta.json").write_text(json.dumps({**meta, "step": step, "python_rng": py_state}, default=str))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():  # re-saving the same step (e.g. preempted right after a periodic save)
        old = root / f".old_{final.name}_{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_meta(path: Path) -> dict:
    meta_path = path / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{meta_path}: checkpoint metadata not found") from None
    except ValueError as e:
        raise ConfigError(f"{meta_path}: corrupt checkpoint metadata ({e})") from None
    if "model_config" not in meta or "step" not in meta:
        raise ConfigError(f"{meta_path}: checkpoint metadata lacks model_config/step")
    return meta


def load_checkpoint(path: str | os.PathLike, device: torch.device | str = "cpu", with_optim: bool = True) -> dict:
    """Read a step folder: {"meta", "model", "optim", "rng"}; ConfigError if it is unreadable."""
    path = Path(path)
    meta = read_meta(path)
    out = {"meta": meta}
    names = ["model", "rng"] + (["optim"] if with_optim else [])
    for name in names:
        f = path / f"{name}.pt"
        try:
            out[name] = torch.load(f, map_location=device if name != "rng" else "cpu", weights_only=True)
        except FileNotFoundError:
            raise ConfigError(f"{f}: checkpoint file missing") from None
        except Exception as e:  # torch raises several kinds for truncated/corrupt files
            raise ConfigError(f"{f}: corrupt checkpoint file ({e.__class__.__name__}: {str(e)[:200]})") from None
    return out


def latest_valid_checkpoint(ckpt_root: str | os.PathLike, device="cpu", with_optim: bool = True) -> dict | None:
    """The newest step folder that loads; corrupt or partial ones are skipped with a warning."""
    for path in reversed(list_checkpoints(ckpt_root)):
        try:
            ckpt = load_checkpoint(path, device, with_optim)
        except ConfigError as e:
            warnings.warn(f"skipping unusable checkpoint: {e}")
            continue
        ckpt["path"] = path
        return ckpt
    return None


def check_model_config(path, saved: dict, current: dict) -> None:
    """A checkpoint of another model shape is bad input: name the path and the first mismatched key."""
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) != current.get(key):
            raise ConfigError(f"{path}: checkpoint model_config.{key}={saved.get(key)!r} does not match "
                              f"this run's {key}={current.get(key)!r}")


def resolve_checkpoint_dir(ckpt_dir: str | os.PathLike) -> Path:
    """A step folder, or a checkpoints folder (-> its newest valid step folder)."""
    p = Path(ckpt_dir)
    if (p / "meta.json").exists():
        return p
    if not p.is_dir():
        raise ConfigError(f"{p}: checkpoint folder not found")
    for path in reversed(list_checkpoints(p)):
        try:
            read_meta(path)
            return path
        except ConfigError as e:
            warnings.warn(f"skipping unusable checkpoint: {e}")
    raise ConfigError(f"{p}: no valid checkpoint in this folder")


def load_model(ckpt_dir: str | os.PathLike, device: torch.device | str = "cpu"):
    """For other stages: (model in eval mode, tokenizer, meta) from a step folder or a checkpoints folder."""
    from nanochat.tokenizer import Tokenizer
    path = resolve_checkpoint_dir(ckpt_dir)
    ckpt = load_checkpoint(path, device, with_optim=False)
    meta = ckpt["meta"]
    model = build_model(GPTConfig(**meta["model_config"]), device)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise ConfigError(f"{path}/model.pt: does not match its model_config ({str(e)[:200]})") from None
    model.eval()
    tokenizer = Tokenizer.load(meta["tokenizer_dir"])
    meta = {**meta, "path": str(path)}
    return model, tokenizer, meta

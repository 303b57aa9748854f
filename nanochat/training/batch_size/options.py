"""
What the automatic batch size is asked with, in one object. The first group of fields is what the
training run is (it decides memory, so it makes the cache key: resolve.key_inputs); the rest is the
search's own policy and where its answer is cached, which a probe may set without changing the entry
its training reads.
"""
from __future__ import annotations

import os
import time
from dataclasses import KW_ONLY, dataclass
from typing import Callable

DEFAULT_SAFETY_MARGIN = 0.15    # share of the device's memory no trial may use
DEFAULT_STOP_GAIN = 0.05        # a smaller size must be this much faster, in every round, to be chosen


@dataclass
class SearchOptions:
    model: object                       # the model training steps (on the meta device for a key alone)
    optimizers_factory: Callable        # model -> optimizers (fresh ones per trial: their state is allocated)
    seq_len: int
    total_batch_size: int               # tokens per optimizer step over all ranks, kept exact
    world_size: int = 1
    device: object = None               # torch.device or its name; None = the model's
    step_fn: object = None              # (model, optimizers, batch_size) -> None; None = trial.TrainStep
    _: KW_ONLY
    compile: bool = False               # the training compiles its step
    memory_budget_gb: float | None = None   # CPU: None = half the total memory, 0 = no budget (in-process)
    vocab_size: int | None = None       # for the default TrainStep; None = the model's
    autocast_dtype: str | None = "auto"  # "bfloat16" | None; "auto" = bf16 on CUDA
    cache_extra: dict | None = None     # more that decides memory (a recipe's mode): part of the key
    # the search's policy
    safety_margin: float = DEFAULT_SAFETY_MARGIN
    stop_gain: float | None = DEFAULT_STOP_GAIN   # None: no speed check
    timed_steps: int = 1                # steps timed per size in the speed check
    time_limit_s: float | None = None   # no trial starts past this; the best size so far is kept
    compile_backend: object = "inductor"
    compiled: object = None             # the training's own compiled module: compiled trials step it
    compiled_search: bool = True        # search compiled (dynamic) or eager plus one compiled confirmation
    budget_child_threads: int = 0       # CPU budget child's threads; 0 = this process's
    clock: Callable = time.monotonic    # times the trials and the time limit (tests drive it)
    # the cache
    use_cache: bool = True
    refresh_cache: bool = False
    cache_dir: str | os.PathLike | None = None   # None = <base_dir>/batch_size_cache
    base_dir: str | os.PathLike | None = None

"""
The configs of the training recipes. TrainingConfig holds the fields base, mid and SFT training share
(one name per quantity: seq_len is the tokens of one row everywhere); TrainConfig adds base and mid
training's own. Every field is a YAML key of the stage; validate() checks the values a run would refuse,
each problem one ConfigError line "<kind>.<key>=<value>: <problem>".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from nanochat.errors import ConfigError
from nanochat.training.routes import COMPILE_CHOICES, PRECISION_CHOICES

DEVICE_TYPES = ("", "cpu", "cuda", "mps")


@dataclass
class TrainingConfig:
    """Fields every training recipe has (base_dir, out_dir, init_from and device_type are filled by the
    jobs layer or the caller: docs/CONTRACTS.md)."""
    kind: ClassVar[str] = "train"      # the stage kind named in error messages
    # A YAML key that was renamed -> its new name: the spec refuses the old one naming the new one.
    renamed_keys: ClassVar[dict[str, str]] = {}
    base_dir: str = ""                 # shared artifacts; "" -> nanochat.files.get_base_dir()
    out_dir: str = ""                  # this stage's folder: checkpoints/, metrics.csv; "" = nothing written
    init_from: str = ""                # checkpoint folder to start from
    device_type: str = ""              # "" = cuda if available, else cpu
    seq_len: int = 256                 # tokens per row
    device_batch_size: int = 0         # rows per forward/backward on one device; 0 = automatic
    total_batch_size: int = 0          # tokens per optimizer step over all ranks; 0 = one micro-batch per rank
    matrix_lr: float = 0.02            # Muon
    embedding_lr: float = 0.2          # AdamW, token embedding
    unembedding_lr: float = 0.004      # AdamW, lm_head
    weight_decay: float = 0.0
    seed: int = 42
    overlap: bool = True               # prefetch, all-reduce during backward, shard Muon; false = plain path
    peak_flops: float = 0.0            # bf16 dense FLOP/s of one device for MFU; 0 = nanochat.peaks' table/fallback

    def problem(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.kind}.{key}={getattr(self, key)!r}: {message}")

    def validate(self) -> None:
        if self.seq_len < 1:
            raise self.problem("seq_len", "must be positive")
        zero_means = {"device_batch_size": "automatic", "total_batch_size": "one micro-batch per rank",
                      "peak_flops": "the peak table or the CUDA properties"}
        for key, meaning in zero_means.items():
            if getattr(self, key) < 0:
                raise self.problem(key, f"must be >= 0 (0: {meaning})")
        if not isinstance(self.overlap, bool):
            raise self.problem("overlap", "expected true or false")
        if self.device_type not in DEVICE_TYPES:
            raise self.problem("device_type", "expected '', cpu, cuda or mps")


@dataclass
class TrainConfig(TrainingConfig):
    """Base and mid training (nanochat.training.train_loop)."""
    num_steps: int = 0                 # optimizer steps; 0 = from target_param_data_ratio
    target_param_data_ratio: float = 20.0  # tokens / parameters (Chinchilla) when num_steps is 0
    warmdown_ratio: float = 0.2        # share of the steps over which the LR decays linearly
    final_lr_frac: float = 0.0         # LR multiplier at the last step
    eval_every: int = 0                # val bpb every N steps (0: only at the end); always at the end
    eval_tokens: int = 32768           # tokens per val bpb evaluation (all ranks)
    save_every: int = 0                # checkpoint every N steps (0: only at the end / on stop)
    keep_checkpoints: int = 2          # step folders kept
    log_every: int = 10                # metrics.csv row every N steps (and the last step)
    compile: str = "auto"              # auto (on for cuda; on a cpu for long runs: routes.resolve_compile) | on | off
    precision: str = "auto"            # auto | fast | fp32 | bf16: matmul precision (routes.train_precision_route)
    num_streams: int = 0               # data streams; 0 = world_size (see dataloader.py)

    def validate(self) -> None:
        super().validate()
        for key in ("num_steps", "eval_every", "save_every", "num_streams"):
            if getattr(self, key) < 0:
                raise self.problem(key, "must be >= 0")
        if self.log_every <= 0:
            raise self.problem("log_every", "must be positive")
        if self.keep_checkpoints < 1:
            raise self.problem("keep_checkpoints", "must be >= 1")
        if not 0.0 <= self.warmdown_ratio <= 1.0:
            raise self.problem("warmdown_ratio", "must be in [0, 1]")
        if self.precision not in PRECISION_CHOICES:
            raise self.problem("precision", f"expected one of {', '.join(PRECISION_CHOICES)}")
        if str(self.compile).lower() not in COMPILE_CHOICES:
            raise self.problem("compile", "expected one of auto, on, off")

"""
The base_eval stage (after base or mid training): the CORE metric, scored by nanochat.evaluate.
"""
from __future__ import annotations

from dataclasses import dataclass

from nanochat.evaluate import run_base_eval, run_eval


@dataclass
class BaseEvalConfig:
    data_dir: str = ""            # "" = <base_dir>/eval_data; "fixtures" = the small sets in the repository
    max_per_task: int = 0         # examples per task (0 = all)
    base_dir: str = ""
    out_dir: str = ""
    init_from: str = ""           # checkpoint folder (a stage name in a pipeline)
    device_type: str = ""


def run(cfg: BaseEvalConfig, should_stop=None) -> list[dict]:
    """One result dict per CORE task, then CORE itself (in `centered`)."""
    return run_eval(cfg, run_base_eval)

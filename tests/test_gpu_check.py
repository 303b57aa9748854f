"""
`python -m jobs gpu-check` where there is no CUDA (here): one line saying why, exit 0. And what can be
checked of its GPU recipe on a CPU: every check's config builds and validates, the out-of-memory batch
is several times the device's memory, and the byte-level tokenizer route trains and fine-tunes
without rustbpe (the lent GPU machine has none).
"""
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from jobs import gpu_check

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-CUDA path")
def test_gpu_check_without_cuda_is_one_line_and_exit_0():
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for cmd in ([sys.executable, "-m", "jobs", "gpu-check"], ["make", "-s", "gpu-check", f"PY={sys.executable}"]):
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.splitlines()
        assert len(lines) == 1 and proc.stderr == "", (proc.stdout, proc.stderr)
        result = json.loads(lines[0])
        assert result["command"] == "gpu-check" and result["state"] == "SKIPPED" and "CUDA" in result["reason"]


def test_every_check_config_builds_and_validates(tmp_path):
    from nanochat.train_loop import validate_common
    gpu_check.inference_config("cpu").validate()
    validate_common(gpu_check.train_compiled_config(tmp_path, 265, "cpu"))
    gpu_check.sft_config(tmp_path, str(tmp_path / "base" / "checkpoints"), "cpu").validate()
    cfg = gpu_check.oom_config(tmp_path, 265, 80 * 2**30, "cpu")
    validate_common(cfg)
    assert cfg.total_batch_size == cfg.device_batch_size * cfg.seq_len and cfg.compile == "off"
    assert set(gpu_check.CHECKS) == {"gpu_tests", "inference", "train_compiled", "sft_compile", "oom_fallback",
                                     "nvml", "nccl"}


@pytest.mark.parametrize("gib", [24, 40, 80, 141])
def test_oom_batch_is_several_times_the_device_memory(gib):
    depth, T = gpu_check.OOM_DEPTH, gpu_check.OOM_SEQ_LEN
    rows = gpu_check.oom_batch_rows(gib * 2**30, depth, T)
    activation_bytes = rows * T * 34 * depth * 64 * depth
    assert rows & (rows - 1) == 0                              # a power of two: halving stays exact
    assert 3 * gib * 2**30 <= activation_bytes < 6 * gib * 2**30


@pytest.mark.slow
def test_byte_tokenizer_route_needs_no_rustbpe(tmp_path, monkeypatch):
    from nanochat.base_train import run as base_run
    from nanochat.chat_sft import bench as sft_bench
    monkeypatch.setitem(sys.modules, "rustbpe", None)          # `import rustbpe` now raises ImportError
    torch.set_num_threads(1)
    vocab = gpu_check.prepare_byte_tokenizer(tmp_path)
    assert vocab == gpu_check.byte_tokenizer_vocab() == 265
    cfg = replace(gpu_check.train_compiled_config(tmp_path, vocab, "cpu"), depth=1, compile="off",
                  device_batch_size=2, total_batch_size=2 * 256, num_steps=2)
    row = base_run(cfg)
    assert row["state"] == "COMPLETED" and (Path(cfg.out_dir) / "checkpoints").is_dir()
    sft = replace(gpu_check.sft_config(tmp_path, str(Path(cfg.out_dir) / "checkpoints"), "cpu"),
                  max_steps=2, num_conversations=24)
    [sft_row] = sft_bench(sft, ("eager-dynamic",))
    assert sft_row["state"] == "COMPLETED" and sft_row["final_loss"] > 0

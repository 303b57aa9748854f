"""
`python -m jobs gpu-check` where there is no CUDA (here): one line saying why, exit 0. And what can be
checked of its GPU recipe on a CPU: every check's config builds and validates, the out-of-memory batch
is several times the device's memory, and the byte-level tokenizer route trains and fine-tunes
without rustbpe (the lent GPU machine has none).
"""
import ast
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from jobs.commands import gpu_check

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
    gpu_check.inference_config("cpu").validate()
    gpu_check.train_compiled_config(tmp_path, 265, "cpu").validate()
    gpu_check.sft_config(tmp_path, str(tmp_path / "base" / "checkpoints"), "cpu").validate()
    cfg = gpu_check.oom_config(tmp_path, 265, 80 * 2**30, "cpu")
    cfg.validate()
    assert cfg.total_batch_size == cfg.device_batch_size * cfg.seq_len and cfg.compile == "off"
    # cheapest first (a run cut short has the most done), the compiling ones last
    assert list(gpu_check.CHECKS) == ["nvml", "nccl", "inference", "oom_fallback", "train_compiled", "sft_compile",
                                      "gpu_tests"]


@pytest.mark.parametrize("gib", [24, 40, 80, 141])
def test_oom_batch_is_several_times_the_device_memory(gib):
    depth, T = gpu_check.OOM_DEPTH, gpu_check.OOM_SEQ_LEN
    rows = gpu_check.oom_batch_rows(gib * 2**30, depth, T)
    activation_bytes = rows * T * 34 * depth * 64 * depth
    assert rows & (rows - 1) == 0                              # a power of two: halving stays exact
    assert 3 * gib * 2**30 <= activation_bytes < 6 * gib * 2**30


@pytest.mark.slow
def test_byte_tokenizer_route_needs_no_rustbpe(tmp_path, monkeypatch):
    from nanochat.recipes.base_train import run as base_run
    from nanochat.recipes.sft import bench as sft_bench
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


def _needs_rustbpe(node: ast.AST) -> bool:
    """Trains a BPE tokenizer (Tokenizer.train) or imports rustbpe anywhere inside `node`."""
    for n in ast.walk(node):
        if isinstance(n, ast.Attribute) and n.attr == "train" and isinstance(n.value, ast.Name) and n.value.id == "Tokenizer":
            return True
        if isinstance(n, (ast.Import, ast.ImportFrom)) and any("rustbpe" in (a.name or "") for a in n.names):
            return True
        if isinstance(n, ast.ImportFrom) and "rustbpe" in (n.module or ""):
            return True
    return False


def test_gpu_marked_tests_need_no_rustbpe():
    """The lent GPU machine has no rustbpe: no gpu-marked test, nor a helper of its module it calls
    (followed call by call), nor its module's top-level code may train a BPE tokenizer."""
    offenders = []
    for path in sorted((REPO / "tests").glob("test_*.py")):
        tree = ast.parse(path.read_text())
        marked_module = any(isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "pytestmark" for t in n.targets)
                            and "attr='gpu'" in ast.dump(n) for n in tree.body)
        functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
        gpu_tests = [f for name, f in functions.items() if name.startswith("test_")
                     and (marked_module or any("attr='gpu'" in ast.dump(d) for d in f.decorator_list))]
        if not gpu_tests:
            continue
        top_level = [n for n in tree.body if not isinstance(n, (ast.FunctionDef, ast.ClassDef))]
        if any(_needs_rustbpe(n) for n in top_level):
            offenders.append(f"{path.name}: module level")
        for test in gpu_tests:
            todo, seen = [test], set()
            while todo:
                f = todo.pop()
                if f.name in seen:
                    continue
                seen.add(f.name)
                if _needs_rustbpe(f):
                    offenders.append(f"{path.name}::{test.name} (in {f.name})")
                todo += [functions[n.func.id] for n in ast.walk(f) if isinstance(n, ast.Call)
                         and isinstance(n.func, ast.Name) and n.func.id in functions]
    assert not offenders, offenders


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def _train_in_budget(cfg) -> tuple[dict, int]:
    """Runs in the memory-budget child: base training; its row and the resident bytes before it."""
    from nanochat.recipes.base_train import run
    before = _rss_bytes()
    return run(cfg), before


def _sft_in_budget(B: int) -> tuple[dict, int]:
    """Runs in the memory-budget child: SFT of a fresh model at a configured device batch B."""
    from nanochat.recipes.sft import SFTConfig, render_examples
    from nanochat.training.sft_loop import train
    from nanochat.gpt import GPTConfig, build_model
    from nanochat.synthetic import generate_conversations
    from nanochat.tokenizer import Tokenizer
    T, tok = 64, Tokenizer.byte_level()
    convs = generate_conversations(2 * B + 8, seed=1, max_tokens=T)
    model = build_model(GPTConfig.from_depth(1, tok.get_vocab_size(), T))
    cfg = SFTConfig(mode="eager-dynamic", seq_len=T, device_batch_size=B, max_steps=1, save_checkpoint=False,
                    val_conversations=0)
    before = _rss_bytes()
    return train(cfg, model, tok, render_examples(convs, tok, T, "test"), [], B, "config"), before


@pytest.mark.slow
def test_oom_fallback_check_passes_a_real_fallback_and_the_peak_is_the_kept_sizes(tmp_path):
    """A real out-of-memory on a CPU (the budget child's allocator) in base training at a configured
    batch: the oom_fallback check's own verdict accepts the row (config+oom_fallback), and the row's peak
    is the size it went on with, not the failed attempts' (the same training configured at that size)."""
    from nanochat.training.batch_size.budget import run_under_memory_budget
    vocab = gpu_check.prepare_byte_tokenizer(tmp_path, 2, 200_000)
    cfg = replace(gpu_check.oom_config(tmp_path, vocab, 1 << 30, "cpu"), depth=1, seq_len=64, device_batch_size=2048,
                  total_batch_size=2048 * 64, num_shards=2, data_max_chars=200_000, max_data_epochs=0)
    row, before = run_under_memory_budget(_train_in_budget, (cfg,), 0.5, threads=1)
    figures = gpu_check.oom_fallback_figures(row, cfg)
    assert figures["device_batch_size"] < 2048 and figures["batch_size_source"] == "config+oom_fallback"
    kept = replace(cfg, device_batch_size=row["device_batch_size"])
    ref, ref_before = run_under_memory_budget(_train_in_budget, (kept,), 0.5, threads=1)
    assert ref["batch_size_source"] == "config" and ref["device_batch_size"] == row["device_batch_size"]
    peak, ref_peak = row["peak_memory_bytes"] - before, ref["peak_memory_bytes"] - ref_before
    assert peak < 1.25 * ref_peak, (peak >> 20, ref_peak >> 20)   # without the reset: the failed attempts


@pytest.mark.slow
def test_sft_row_peak_after_an_oom_fallback_is_the_kept_sizes():
    from nanochat.training.batch_size.budget import run_under_memory_budget
    row, before = run_under_memory_budget(_sft_in_budget, (4096,), 0.4, threads=1)
    assert row["batch_size_source"] == "config+oom_fallback" and row["device_batch_size"] < 1024
    ref, ref_before = run_under_memory_budget(_sft_in_budget, (row["device_batch_size"],), 0.4, threads=1)
    peak, ref_peak = row["peak_memory_bytes"] - before, ref["peak_memory_bytes"] - ref_before
    assert peak < 1.25 * ref_peak, (peak >> 20, ref_peak >> 20)   # without the reset: the failed attempts


def test_every_check_s_result_is_written_at_once_and_the_budget_stops_the_rest(tmp_path, monkeypatch, capsys):
    ran = []

    def passes(ctx):
        ran.append("a")
        return {"figure": 1}

    def fails(ctx):
        ran.append("b")
        raise RuntimeError("broken")

    def never(ctx):
        raise AssertionError("started past the budget")
    monkeypatch.setattr(gpu_check, "CHECKS", {"a": passes, "b": fails, "c": never})
    out = tmp_path / "gpu-check.json"
    report = gpu_check.Report(["a", "b", "c"], {"device": "test"}, str(out))
    snapshots = []

    def update(results, running):
        report.update(results, running)
        snapshots.append(json.loads(out.read_text()))
    clock = iter([0.0, 1.0, 11.0])              # the third check would start past the deadline (10)
    results = gpu_check.run_checks(["a", "b", "c"], {"deadline": 10.0}, update, clock=lambda: next(clock))
    assert ran == ["a", "b"] and results["c"]["state"] == "NOT_RUN"
    assert [(s["running"], sorted(s["checks"])) for s in snapshots] == [("a", []), (None, ["a"]), ("b", ["a"]),
                                                                        (None, ["a", "b"])]
    assert snapshots[1]["state"] == "RUNNING" and snapshots[1]["pending"] == ["b", "c"]
    final = report.finish()
    assert final["state"] == "FAIL" and final["failed"] == ["b", "c"] and json.loads(out.read_text()) == final
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 5 and json.loads(lines[-1]) == final      # one JSON line per update, the final last


def test_at_the_wall_the_running_check_fails_and_the_final_json_is_written(tmp_path):
    out = tmp_path / "gpu-check.json"
    report = gpu_check.Report(["nvml", "inference", "gpu_tests"], {"device": "test"}, str(out))
    report.update({"nvml": {"state": "PASS", "seconds": 1.0}}, "inference")
    child = subprocess.Popen(["sleep", "600"], start_new_session=True)     # as the pytest child runs
    exits = []
    report.at_the_wall({"child": child}, exit=exits.append)
    assert exits == [1] and child.wait(timeout=30) == -9
    final = json.loads(out.read_text())
    assert final["state"] == "FAIL" and final["checks"]["nvml"]["state"] == "PASS"
    assert final["checks"]["inference"]["state"] == "FAIL" and "time budget" in final["checks"]["inference"]["error"]
    assert final["checks"]["gpu_tests"]["state"] == "NOT_RUN"
    report.update({}, "gpu_tests")                                         # a late update changes nothing
    assert json.loads(out.read_text()) == final


def test_pytest_out_of_time_prints_what_it_was_doing(tmp_path, capsys):
    hang = tmp_path / "test_hang.py"
    hang.write_text("import threading\nimport pytest\n\n\n@pytest.mark.gpu\n"
                    "def test_waits_forever():\n    threading.Event().wait()\n")
    import time
    ctx = {"workdir": tmp_path, "deadline": time.time() + 25, "gpu_test_files": [str(hang)]}
    with pytest.raises(AssertionError, match="did not finish in .* s .last: .*test_waits_forever"):
        gpu_check.check_gpu_tests(ctx)
    assert "test session starts" in capsys.readouterr().err and "child" not in ctx

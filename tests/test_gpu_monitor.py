"""
gpu_util_mean: the sampler's own logic (a thread that starts, reads, stops and averages), the empty
cell on a CPU and without NVML (real: this machine has nvidia-ml-py but no driver), and the stage
putting the sampler's mean into its row. The NVML reading itself is checked on a GPU (test_gpu.py).
"""
import json
import threading

import pytest
import yaml

from nanochat import gpu_monitor
from nanochat.gpu_monitor import UtilSampler, nvml_reader, start_gpu_sampler


class Counter:
    """A source that counts its reads and returns 10, 20, 30, ... (stands for any reading)."""

    def __init__(self, signal_at: int = 0):
        self.reads = 0
        self.threads = set()
        self.signal_at, self.reached = signal_at, threading.Event()

    def __call__(self):
        self.reads += 1
        self.threads.add(threading.current_thread().name)
        if self.reads == self.signal_at:
            self.reached.set()
        return 10.0 * self.reads


def test_sampler_reads_in_a_thread_until_stopped_and_averages():
    source = Counter(signal_at=5)
    sampler = UtilSampler(source, interval_s=0.01).start()
    assert sampler.running and source.reads == 1           # one reading at start
    assert source.reached.wait(timeout=60)                 # the thread's readings, however busy the machine
    mean = sampler.stop()
    assert not sampler.running
    n = source.reads
    assert n >= 6                                           # start + thread readings + one at stop
    assert mean == pytest.approx(sum(10.0 * i for i in range(1, n + 1)) / n)
    assert "gpu-util-sampler" in source.threads
    assert not any(t.name == "gpu-util-sampler" for t in threading.enumerate())   # stopped means stopped
    assert sampler.stop() == mean                           # a second stop changes nothing


def test_sampler_skips_failed_reads_and_is_empty_without_readings():
    values = iter([None, 50.0, RuntimeError("flaky"), 70.0])
    all_read = threading.Event()

    def read():
        v = next(values, None)
        if v == 70.0:
            all_read.set()
        if isinstance(v, Exception):
            raise v
        return v
    sampler = UtilSampler(read, interval_s=0.01).start()
    assert all_read.wait(timeout=60)                       # the thread has read all four (however busy the machine)
    assert sampler.stop() == pytest.approx(60.0)
    assert UtilSampler(lambda: None, interval_s=0.01).start().stop() is None
    with pytest.raises(RuntimeError, match="already started"):
        s = UtilSampler(lambda: 1.0, interval_s=10).start()
        try:
            s.start()
        finally:
            s.stop()


def test_no_sampler_on_cpu_or_without_nvml():
    sampler, why = start_gpu_sampler("cpu")
    assert sampler is None and "cpu" in why
    # this machine: nvidia-ml-py installed, no NVIDIA driver -> NVML's library is not found
    read, why = nvml_reader(0)
    assert read is None and ("NVML unavailable" in why or "not installed" in why)


def _pipeline(tmp_path, monkeypatch, args):
    from jobs import runs, spec
    monkeypatch.setenv("NANOCHAT_RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "work"))
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"name": "p", "stages": {"infer": {"kind": "inference_bench", "args": args}}}))
    return runs.create_run(spec.load_pipeline(path), "util", "local", [])


TINY = {"depth": 1, "vocab_size": 256, "prompt_len": 4, "new_tokens": 3, "num_samples": 1, "diversity_samples": 2}


def _rows(run_dir):
    return [json.loads(p.read_text()) for p in sorted((run_dir / "rows").glob("*.json"))]


def test_stage_rows_on_cpu_have_an_empty_gpu_util_mean(tmp_path, monkeypatch):
    from jobs import stages
    _run, run_dir = _pipeline(tmp_path, monkeypatch, TINY)
    stages.run_stage(run_dir, "infer")
    rows = _rows(run_dir)
    assert rows and all(r["state"] in ("COMPLETED", "SKIPPED") for r in rows)
    assert all(r["gpu_util_mean"] is None for r in rows)


def test_stage_puts_the_samplers_mean_in_its_rows_also_when_it_fails(tmp_path, monkeypatch):
    # Wiring only: the stage asks for a sampler for its device, stops it when the recipe ends (also on
    # failure) and writes the mean into every row. The sampler reads a Counter here, not a GPU.
    from jobs import stages
    asked = []

    def fake_start(device_type, cuda_index=None, interval_s=0.5):
        asked.append(device_type)
        return UtilSampler(Counter(), interval_s=3600).start(), ""
    monkeypatch.setattr(gpu_monitor, "start_gpu_sampler", fake_start)
    _run, run_dir = _pipeline(tmp_path, monkeypatch, TINY)
    stages.run_stage(run_dir, "infer")
    assert asked == ["cpu"]
    assert {r["gpu_util_mean"] for r in _rows(run_dir)} == {15.0}     # readings 10 (start) and 20 (stop)

    # a recipe that fails while the sampler runs (a bad checkpoint path is refused at submit now, so
    # the failure is the recipe's own)
    import nanochat.recipes.inference_bench

    def failing_recipe(cfg, should_stop=None):
        raise RuntimeError("the recipe failed")
    monkeypatch.setattr(nanochat.recipes.inference_bench, "run", failing_recipe)
    _run, run_dir = _pipeline(tmp_path / "b", monkeypatch, TINY)
    with pytest.raises(RuntimeError, match="the recipe failed"):
        stages.run_stage(run_dir, "infer")
    [row] = _rows(run_dir)
    assert row["state"] == "FAILED" and row["gpu_util_mean"] == 15.0

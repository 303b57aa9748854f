"""
The batch-size cache entry a probe writes must be the entry its training stage reads: for every
pipeline in pipelines/ and every probe grid in sbatch/, on CPU and as on a GPU node, run locally and
under Slurm. Built on the meta device (no memory, no GPU): only the key is computed, by the same
functions the probe (nanochat.recipes.probe.run) and the training loop (training.train_loop.resolve_batch) call.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest
import torch

import nanochat.training.batch_size.resolve as abs_mod
import nanochat.recipes.probe as probe_recipe
from jobs.commands import probe as probe_command
from jobs.array import load_grid, render_command
from jobs.spec import REPO_ROOT, load_pipeline, resolve_pipeline_path
from jobs.stages import build_config
from nanochat.training.batch_size.cache import cache_key
from nanochat.recipes.probe import probe_cache_key
from nanochat.gpt import GPTConfig, build_model
from nanochat.training.train_loop import batch_cache_key

PIPELINES = sorted((REPO_ROOT / "pipelines").glob("*.yaml"))
GRIDS = [g for g in sorted((REPO_ROOT / "sbatch").glob("*grid*.yaml")) if load_grid(g)["kind"] == "probe"]
META = torch.device("meta")


@pytest.fixture(params=["cpu", "cuda"])
def device(request, monkeypatch):
    """The device the stages run on. "cuda" on this CPU machine: only the two hardware queries the key
    reads are answered as an A100 node would answer them; compile and autocast follow device.type."""
    if request.param == "cuda":
        monkeypatch.setattr(abs_mod, "device_name", lambda d: "NVIDIA A100-SXM4-80GB")
        monkeypatch.setattr(abs_mod, "device_total_memory", lambda d: 85_100_000_000)
    return torch.device(request.param)


def training_model(cfg):
    """The model base_train builds (nanochat.recipes.base_train.run: GPTConfig.from_depth with the tokenizer's
    vocabulary, which is cfg.vocab_size), here on the meta device."""
    return build_model(GPTConfig.from_depth(cfg.depth, cfg.vocab_size, cfg.seq_len), META)


def world_size_at_run_time(executor: str, stage) -> int:
    # submit.py asks Slurm for nodes x tasks_per_node tasks, one rank each; a local run is one process
    return 1 if executor == "local" else stage.resources.nodes * stage.resources.tasks_per_node


def auto_tasks(pipeline, stage) -> list[int | None]:
    """The tasks (variants) of a training stage that read the cache (device_batch_size 0)."""
    if not stage.variants:
        return [None] if int(stage.args.get("device_batch_size", 0) or 0) == 0 else []
    return [i for i, v in enumerate(stage.variants)
            if int({**stage.args, **v.args}.get("device_batch_size", 0) or 0) == 0]


def model_depth_in_key(cfg, device) -> dict:
    return abs_mod.key_inputs(probe_recipe.probe_options(cfg, probe_recipe.probe_model(cfg, META), device)).parts


@pytest.mark.parametrize("path", PIPELINES, ids=[p.stem for p in PIPELINES])
@pytest.mark.parametrize("executor", ["local", "slurm"])
def test_probe_stage_writes_the_key_its_training_stage_reads(path, executor, device, tmp_path):
    pipeline = load_pipeline(path)
    run = {"run_id": "keys", "workdir": str(tmp_path), "executor": executor}
    probes = [s for s in pipeline.stages.values() if s.kind == "probe"]
    auto_train = [s for s in pipeline.stages.values() if s.kind == "base_train" and auto_tasks(pipeline, s)]
    assert not auto_train or probes, f"{path.name}: an automatic base_train without a probe stage"
    mids_checked: list[str] = []
    for probe in probes:
        served_name = probe.args.get("serves")
        assert served_name, f"{path.name}: stages.{probe.name} names no training stage (serves)"
        probe_cfg, _ = build_config(run, pipeline, probe.name, None)
        written = probe_cache_key(probe_cfg, device)
        served = pipeline.stages[served_name]
        tasks = auto_tasks(pipeline, served)
        assert tasks, f"{path.name}: {served_name} has no variant with an automatic batch size"
        for task in tasks:
            cfg, _ = build_config(run, pipeline, served_name, task)
            read = batch_cache_key(cfg, training_model(cfg), world_size_at_run_time(executor, served), device)
            assert written == read, (f"{path.name}: {probe.name} writes {written[:12]}, {served_name}[{task}] "
                                     f"reads {read[:12]} ({executor}, {device.type})")
        # a mid_train of the same shape, from the served stage's checkpoint, reads the same entry
        for mid in (m for m in pipeline.stages.values() if m.kind == "mid_train" and auto_tasks(pipeline, m)):
            if mid.args.get("init_from") != served_name:
                continue
            mid_cfg, _ = build_config(run, pipeline, mid.name, None)
            base_cfg, _ = build_config(run, pipeline, served_name, tasks[0])
            if (mid_cfg.seq_len, mid_cfg.total_batch_size, mid_cfg.compile, mid_cfg.precision) == \
                    (base_cfg.seq_len, base_cfg.total_batch_size, base_cfg.compile, base_cfg.precision):
                mid_key = batch_cache_key(mid_cfg, training_model(base_cfg), world_size_at_run_time(executor, mid), device)
                assert mid_key == written, f"{path.name}: {mid.name} misses the probe's entry"
                mids_checked.append(mid.name)
        # the probe honours its own stage's time limit
        assert 0 < probe_cfg.time_limit_s < probe.resources.time_min * 60
    if path.stem in ("smoke", "artemis-a100"):
        assert mids_checked == ["mid_train"]    # their mid_train has base_train's shape: a cache hit too


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_precision_reaches_the_probe_key(precision, device, tmp_path):
    """A training stage's precision changes its activations' memory: the probe that serves it trials
    under the same autocast (and so writes the entry that stage reads), and the key differs from the
    default precision's wherever the two routes differ."""
    run = {"run_id": "keys", "workdir": str(tmp_path), "executor": "slurm"}
    keys = {}
    for p in ("auto", precision):
        pipeline = load_pipeline(resolve_pipeline_path("artemis-a100"), [f"base_train.precision={p}"])
        probe_cfg, _ = build_config(run, pipeline, "probe", None)
        assert probe_cfg.precision == p
        cfg, _ = build_config(run, pipeline, "base_train", None)
        keys[p] = batch_cache_key(cfg, training_model(cfg), world_size_at_run_time("slurm", pipeline.stages["base_train"]), device)
        assert probe_cache_key(probe_cfg, device) == keys[p], p
    # auto is bf16 on CUDA and fp32 on a CPU: the other one must have its own entry
    same_route = (device.type == "cuda") == (precision == "bf16")
    assert (keys["auto"] == keys[precision]) == same_route


@pytest.mark.parametrize("grid_path", GRIDS, ids=[g.stem for g in GRIDS])
def test_probe_grid_rows_write_the_keys_the_named_training_stage_reads(grid_path, device, tmp_path):
    grid = load_grid(grid_path)
    assert grid["command"], f"{grid_path.name}: a probe grid carries its command (pipeline + stage per row)"
    parser = argparse.ArgumentParser()
    probe_command.add_arguments(parser)
    depths = set()
    for row in grid["rows"]:
        argv = render_command(grid["command"], {**row, "python": sys.executable, "task": 0, "run_id": "r",
                                                "results_dir": str(tmp_path)}, str(grid_path))
        assert argv[1:4] == ["-m", "jobs", "probe"], argv
        args = parser.parse_args(argv[4:] + ["--base-dir", str(tmp_path)])
        probe_cfg = probe_command.config_from_args(args)
        written = probe_cache_key(probe_cfg, device)
        # what the user then runs on the cluster: submit PIPELINE --set defaults.depth=D
        pipeline = load_pipeline(resolve_pipeline_path(row["pipeline"]), [f"defaults.depth={row['depth']}"])
        served = pipeline.stages[row["serves"]]
        run = {"run_id": "keys", "workdir": str(tmp_path), "executor": "slurm"}
        for task in auto_tasks(pipeline, served):
            cfg, _ = build_config(run, pipeline, served.name, task)
            read = batch_cache_key(cfg, training_model(cfg), world_size_at_run_time("slurm", served), device)
            assert written == read, (grid_path.name, row)
        depths.add(model_depth_in_key(probe_cfg, device)["model"]["config"]["n_layer"])
    assert depths == {row["depth"] for row in grid["rows"]}   # each row really is its own model size


def test_key_changes_with_everything_training_reads(device):
    """The key is a function of what changes memory: each of these must give a different key."""
    from nanochat.recipes.probe import ProbeConfig
    base = dict(depth=2, seq_len=64, vocab_size=512, total_batch_size=64 * 8, world_size=1, compile="auto",
                device_type=device.type)
    keys = {probe_cache_key(ProbeConfig(**base), device)}
    for change in ({"depth": 3}, {"seq_len": 32}, {"vocab_size": 1024}, {"world_size": 2, "total_batch_size": 64 * 16},
                   {"total_batch_size": 64 * 16}, {"compile": "off" if device.type == "cuda" else "on"}):
        keys.add(probe_cache_key(ProbeConfig(**{**base, **change}), device))
    assert len(keys) == 7
    # the probe's own policy (margin, speed check, time limit) is not what training is: same entry
    policy = ProbeConfig(**base, safety_margin=0.3, stop_gain=-1, time_limit_s=60)
    assert probe_cache_key(policy, device) == probe_cache_key(ProbeConfig(**base), device)
    assert cache_key({"a": 1}) == cache_key({"a": 1})


def test_serves_is_validated(tmp_path):
    from nanochat.errors import ConfigError
    import yaml
    raw = yaml.safe_load((REPO_ROOT / "pipelines" / "smoke.yaml").read_text())
    cases = [({"serves": "sft"}, "serves"), ({"serves": "nope"}, "unknown stage"),
             ({"serves": "base_train", "seq_len": 64}, "stages.probe.args.seq_len"),
             ({"serves": "base_train", "memory_budget_gb": 2.0}, "stages.probe.args.memory_budget_gb")]
    for args, message in cases:
        bad = json.loads(json.dumps(raw))
        bad["stages"]["probe"]["args"] = args
        p = tmp_path / "bad.yaml"
        p.write_text(yaml.safe_dump(bad))
        with pytest.raises(ConfigError, match=message) as e:
            load_pipeline(p)
        assert str(p) in str(e.value)
    # the served stage must run after the probe
    bad = json.loads(json.dumps(raw))
    bad["stages"]["base_train"]["depends_on"] = []
    p = tmp_path / "order.yaml"
    p.write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError, match="must depend on 'probe'"):
        load_pipeline(p)


@pytest.mark.slurm
@pytest.mark.slow
def test_probe_array_on_slurm_fills_the_entry_the_named_stage_reads(local_slurm, tmp_path):
    """sbatch/probe_array.sbatch with a one-row grid (the smoke pipeline's base_train at depth 1, the
    command copied from sbatch/probe_grid.yaml) on the local Slurm: the cache entry it leaves in the
    work directory is the one `submit smoke --set defaults.depth=1 --executor slurm` reads."""
    import os
    import subprocess
    import time
    import yaml
    from nanochat.training.batch_size.cache import read_cache
    shipped = load_grid(REPO_ROOT / "sbatch" / "probe_grid.yaml")
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"name": "probe", "kind": "probe", "command": shipped["command"],
                                    "rows": [{"pipeline": "pipelines/smoke.yaml", "serves": "base_train", "depth": 1}]}))
    work = tmp_path / "work"
    env = dict(os.environ, PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
               NANOCHAT_BASE_DIR=str(work), NANOCHAT_RESULTS_DIR=str(tmp_path / "results"), RUN_ID="probe-array")
    out = subprocess.run(["sbatch", "--parsable", "--array=0-0", "--gpus-per-node=0", "--cpus-per-task=1",
                          f"--output={tmp_path}/%x-%A_%a.out", "sbatch/probe_array.sbatch", str(grid)],
                         capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    job = out.stdout.strip().split(";")[0]
    deadline, state = time.monotonic() + 600, ""
    while time.monotonic() < deadline:
        sacct = subprocess.run(["sacct", "-X", "-n", "-P", "-j", job, "-o", "JobID,State"], capture_output=True, text=True)
        states = [line.split("|")[1].split()[0] for line in sacct.stdout.split() if line.startswith(f"{job}_0|")]
        state = states[0] if states else ""
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL"):
            break
        time.sleep(2)
    logs = "".join(p.read_text()[-3000:] for p in tmp_path.glob("probe-*.out"))
    assert state == "COMPLETED", logs
    pipeline = load_pipeline(REPO_ROOT / "pipelines" / "smoke.yaml", ["defaults.depth=1"])
    run = {"run_id": "keys", "workdir": str(work), "executor": "slurm"}
    cfg, _ = build_config(run, pipeline, "base_train", None)
    key = batch_cache_key(cfg, training_model(cfg), world_size_at_run_time("slurm", pipeline.stages["base_train"]),
                          torch.device("cpu"))
    entry = read_cache(work / "batch_size_cache", key, cfg.total_batch_size // cfg.seq_len)
    assert entry is not None and entry["source"] == "probe", (sorted(p.name for p in (work / "batch_size_cache").glob("*")), logs)

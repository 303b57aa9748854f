"""The shared training loop through base and mid training: learning, exact resume, batch geometry,
the out-of-memory fallback, metrics."""
import csv
import math

import pytest
import torch

from nanochat.recipes import base_train, mid_train
from nanochat.checkpoint import list_checkpoints, load_checkpoint, load_model
from nanochat.distributed import DistInfo
from nanochat.errors import ConfigError
from nanochat.dataloader import pretraining_loader
from nanochat.dataset import split_shards
from nanochat.gpt import GPT, GPTConfig
from nanochat.prepare import data_dir, ensure_tokenizer, tokenizer_dir
from nanochat.training.config import TrainConfig
from nanochat.training.train_loop import lr_multiplier, muon_momentum, train

from helpers import pretraining_base

VOCAB = 512


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return pretraining_base(tmp_path_factory.mktemp("base"), VOCAB)


def cfg(base_dir, out_dir, **kw):
    d = dict(base_dir=str(base_dir), out_dir=str(out_dir), vocab_size=VOCAB, depth=2, seq_len=64,
             device_batch_size=4, total_batch_size=4 * 64 * 2, num_steps=10, eval_tokens=2048, log_every=2,
             num_shards=3, data_max_chars=400_000)
    d.update(kw)
    return base_train.BaseTrainConfig(**d)


def test_schedules():
    assert lr_multiplier(0, 100, 0.2) == 1.0 and lr_multiplier(79, 100, 0.2) == 1.0
    assert lr_multiplier(90, 100, 0.2) == pytest.approx(0.5) and lr_multiplier(100, 100, 0.2) == 0.0
    assert muon_momentum(0) == pytest.approx(0.85) and muon_momentum(150) == pytest.approx(0.90)
    assert muon_momentum(300) == pytest.approx(0.95) and muon_momentum(1000) == pytest.approx(0.95)


@pytest.mark.slow
def test_base_training_learns(base_dir, tmp_path):
    out = tmp_path / "run"
    row = base_train.run(cfg(base_dir, out, num_steps=40, total_batch_size=8 * 64, device_batch_size=8,
                             eval_every=20, log_every=1))
    assert row["state"] == "COMPLETED" and row["steps"] == 40
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    losses = [float(r["loss"]) for r in rows]
    assert losses[0] > math.log(VOCAB) - 0.5  # starts near uniform (nanochat's init)
    # one batch's loss is noisy (the corpus mixes prose, grammar and tables): average the last 10 steps
    assert sum(losses[-10:]) / 10 < math.log(VOCAB) - 1.75, losses[-10:]
    bpb = [float(r["val_bpb"]) for r in rows if r["val_bpb"]]
    assert len(bpb) == 2 and bpb[1] < bpb[0] and row["val_bpb"] == bpb[1]
    for key in ("tokens_per_s", "real_tokens_per_s", "peak_memory_bytes", "n_params"):
        assert row[key] > 0
    assert row["mfu"] is None and row["device_name"] == "cpu" and row["compile"] is False
    assert row["batch_size_source"] == "config" and row["grad_accum_steps"] == 1
    assert [int(r["step"]) for r in rows] == list(range(1, 41))
    assert [r["step"] for r in rows if r["val_bpb"]] == ["20", "40"]
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_000040"]
    model, tok, meta = load_model(out / "checkpoints", "cpu")
    assert meta["step"] == 40 and tok.get_vocab_size() == VOCAB and model.config.n_layer == 2


@pytest.mark.slow
def test_stop_and_resume_is_bitwise_identical(base_dir, tmp_path):
    straight = base_train.run(cfg(base_dir, tmp_path / "a"))
    assert straight["state"] == "COMPLETED"
    calls = {"n": 0}

    def stop_after_4():
        calls["n"] += 1
        return calls["n"] == 4

    first = base_train.run(cfg(base_dir, tmp_path / "b", save_every=3), should_stop=stop_after_4)
    assert first["state"] == "PREEMPTED" and first["step"] == 4
    assert [p.name for p in list_checkpoints(tmp_path / "b" / "checkpoints")] == ["step_000003", "step_000004"]
    second = base_train.run(cfg(base_dir, tmp_path / "b", save_every=3))
    assert second["state"] == "COMPLETED" and second["steps"] == 6 and second["step"] == 10
    a = load_checkpoint(list_checkpoints(tmp_path / "a" / "checkpoints")[-1])
    b = load_checkpoint(list_checkpoints(tmp_path / "b" / "checkpoints")[-1])
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert second["final_loss"] == straight["final_loss"]
    assert second["val_bpb"] == straight["val_bpb"]
    assert a["meta"]["loader"] == b["meta"]["loader"]
    with open(tmp_path / "b" / "metrics.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [2, 4, 6, 8, 10]


def test_batch_geometry_errors(base_dir, tmp_path):
    with pytest.raises(ConfigError, match="total_batch_size"):
        base_train.run(cfg(base_dir, tmp_path, total_batch_size=1000))
    with pytest.raises(ConfigError, match="compile"):
        base_train.run(cfg(base_dir, tmp_path, compile="maybe"))
    with pytest.raises(ConfigError, match=str(tmp_path / "nodata")):
        base_train.run(cfg(tmp_path / "b2", tmp_path, data_source=str(tmp_path / "nodata")))


class AllocatesWhenBatchTooBig(GPT):
    """A model whose forward really fails to allocate (the CPU allocator's own error) when handed
    more than 2 rows: the loop must rerun the same step at half the device batch."""
    def forward(self, idx, *args, **kwargs):
        if idx.size(0) > 2:
            torch.empty(1 << 62, dtype=torch.uint8)  # exabytes: the allocator refuses
        return super().forward(idx, *args, **kwargs)


def _train_direct(base_dir, out_dir, model_cls, device_batch_size):
    data = data_dir(base_dir, num_shards=3, max_chars=400_000)
    tok = ensure_tokenizer(base_dir, VOCAB, data_path=data)
    train_shards, val_shard = split_shards(data)
    torch.manual_seed(0)
    config = GPTConfig.from_depth(2, VOCAB, 64)
    model = model_cls(config)
    model.init_weights()
    tc = TrainConfig(out_dir=str(out_dir), seq_len=64, device_batch_size=device_batch_size,
                     total_batch_size=4 * 64, num_steps=3, eval_tokens=512)
    row = train(tc, stage="test", model=model, tokenizer=tok, tokenizer_dir=str(tokenizer_dir(base_dir, VOCAB, data)),
                dist_info=DistInfo(False, 0, 0, 1, torch.device("cpu")),
                make_train_loader=lambda r, w, n: pretraining_loader(train_shards, tok, 64, r, w, n),
                make_val_loader=lambda r, w, n: pretraining_loader([val_shard], tok, 64, r, w, n))
    return row, model


def test_oom_fallback_reruns_the_step(base_dir, tmp_path):
    with pytest.raises(RuntimeError):  # the failure is real
        AllocatesWhenBatchTooBig(GPTConfig.from_depth(2, VOCAB, 64))(torch.zeros(4, 8, dtype=torch.long))
    row, model = _train_direct(base_dir, tmp_path / "oom", AllocatesWhenBatchTooBig, 4)
    # a configured batch stays the fixed side of the report's comparison after the fallback
    assert row["device_batch_size"] == 2 and row["grad_accum_steps"] == 2
    assert row["batch_size_source"] == "config+oom_fallback"
    ref_row, ref = _train_direct(base_dir, tmp_path / "ref", GPT, 2)
    assert ref_row["grad_accum_steps"] == 2
    for (k, p), q in zip(model.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(p, q), k
    assert row["final_loss"] == ref_row["final_loss"]


@pytest.mark.slow
def test_mid_training_from_base(base_dir, tmp_path):
    base_out = tmp_path / "base"
    base_train.run(cfg(base_dir, base_out, num_steps=4))
    mc = mid_train.MidTrainConfig(base_dir=str(base_dir), out_dir=str(tmp_path / "mid"),
                                  init_from=str(base_out / "checkpoints"), seq_len=64, device_batch_size=4,
                                  total_batch_size=4 * 64, num_steps=20, num_synthetic=200, eval_tokens=1024,
                                  log_every=5)
    row = mid_train.run(mc)
    assert row["state"] == "COMPLETED" and row["steps"] == 20 and row["depth"] == 2
    with open(tmp_path / "mid" / "metrics.csv") as f:
        losses = [float(r["loss"]) for r in csv.DictReader(f)]
    assert losses[-1] < losses[0] - 0.5, losses
    assert row["val_bpb"] > 0
    model, tok, meta = load_model(tmp_path / "mid" / "checkpoints", "cpu")
    assert meta["stage"] == "mid_train" and meta["init_from"].endswith("step_000004")
    with pytest.raises(ConfigError, match="init_from"):
        mid_train.run(mid_train.MidTrainConfig(out_dir=str(tmp_path / "x")))


def test_bench_train_prints_json(base_dir, capsys):
    import argparse
    import json
    from jobs.bench import train as bench_train
    p = argparse.ArgumentParser()
    bench_train.add_arguments(p)
    args = p.parse_args(["--depth", "2", "--seq-len", "64", "--device-batch-size", "4", "--steps", "2",
                         "--vocab-size", str(VOCAB), "--base-dir", str(base_dir),
                         "--data-source", str(data_dir(base_dir, num_shards=3, max_chars=400_000)), "--json"])
    assert bench_train.run(args) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["bench"] == "train" and out["tokens_per_s"] > 0 and out["mfu"] is None
    assert out["variants"]["config"]["device_batch_size"] == 4


def test_train_precision_follows_the_hardware(monkeypatch):
    import nanochat.cpu_features
    from nanochat.training.routes import train_precision_route
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(nanochat.cpu_features, "cpu_has_amx", lambda: True)
    assert train_precision_route("fast", cpu) == "bf16"
    assert train_precision_route("auto", cpu) == "fp32"     # the CPU default stays the exact reference
    monkeypatch.setattr(nanochat.cpu_features, "cpu_has_amx", lambda: False)
    assert train_precision_route("fast", cpu) == "fp32"     # AVX512-BF16 alone measured slower: fall back
    assert train_precision_route("auto", cuda) == "bf16" and train_precision_route("fast", cuda) == "bf16"
    assert train_precision_route("fp32", cuda) == "fp32" and train_precision_route("bf16", cpu) == "bf16"
    with pytest.raises(ValueError, match="precision 'fp16'"):
        train_precision_route("fp16", cpu)
    with pytest.raises(ConfigError, match="precision='half'"):
        base_train.run(base_train.BaseTrainConfig(precision="half"))


@pytest.mark.parametrize("fast_as", ["fast", "bf16"])
def test_bench_train_compares_fast_precision_with_fp32(base_dir, capsys, fast_as):
    """The fast step runs in bf16 on a CPU with AMX (its loss then differs from fp32's, which proves
    the autocast took effect) and stays within 2% of fp32's loss; elsewhere it is fp32 itself."""
    import argparse
    import json
    import nanochat.cpu_features
    from jobs.bench import train as bench_train
    p = argparse.ArgumentParser()
    bench_train.add_arguments(p)
    args = p.parse_args(["--depth", "2", "--seq-len", "64", "--device-batch-size", "4", "--steps", "6",
                         "--vocab-size", str(VOCAB), "--base-dir", str(base_dir), "--compare-precision", "--rounds", "1", "--fast-as", fast_as,
                         "--data-source", str(data_dir(base_dir, num_shards=3, max_chars=400_000)), "--json"])
    assert bench_train.run(args) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    fp32, fast = out["variants"]["fp32"], out["variants"]["fast"]
    assert fp32["precision"] == "fp32"
    assert fast["precision"] == ("bf16" if fast_as == "bf16" or nanochat.cpu_features.cpu_has_amx() else "fp32")
    assert out["ratio_fast_vs_fp32"] > 0 and out["final_loss_gap"] < 0.02
    if fast["precision"] == "bf16":
        assert fast["final_loss"] != fp32["final_loss"]
    else:
        assert fast["final_loss"] == fp32["final_loss"]


class StepClock:
    """train_loop's clock, injected: the first forward/backward of the process takes 100 s (a compile),
    every later one 1 s, and nothing else takes any time."""

    def __init__(self):
        self.now, self.calls = 1000.0, 0

    def time(self) -> float:
        return self.now

    def forward_backward(self, real):
        def timed(*args, **kwargs):
            self.calls += 1
            self.now += 100.0 if self.calls == 1 else 1.0
            return real(*args, **kwargs)
        return timed


def test_metrics_rows_leave_the_warm_up_step_out_of_the_rate(base_dir, tmp_path, monkeypatch):
    import types
    from nanochat.training import train_loop
    clock = StepClock()
    monkeypatch.setattr(train_loop, "time", types.SimpleNamespace(time=clock.time))
    monkeypatch.setattr(train_loop, "forward_backward", clock.forward_backward(train_loop.forward_backward))
    out = tmp_path / "clock"
    row = base_train.run(cfg(base_dir, out, num_steps=5, log_every=1, eval_tokens=256))
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    tokens_per_step = 4 * 64 * 2
    assert rows[0]["tokens_per_s"] == "" and rows[0]["mfu"] == ""     # step 1: only the 100 s warm-up
    assert [float(r["tokens_per_s"]) for r in rows[1:]] == [tokens_per_step / 1.0] * 4
    assert row["tokens_per_s"] == pytest.approx(tokens_per_step / 1.0)


def test_a_given_peak_fills_the_mfu_column_anywhere(base_dir, tmp_path):
    # on a CPU (no table entry, no CUDA properties) a stage's peak_flops key still gives MFU
    out = tmp_path / "peak"
    row = base_train.run(cfg(base_dir, out, num_steps=3, log_every=1, eval_tokens=256, peak_flops=1e12))
    assert row["mfu"] == pytest.approx(row["flops_per_token"] * row["tokens_per_s"] / 1e12 * 100)
    assert (row["peak_flops"], row["peak_flops_source"]) == (1e12, "config")
    with open(out / "metrics.csv") as f:
        assert all(float(r["mfu"]) > 0 for r in list(csv.DictReader(f))[1:])
    with pytest.raises(ConfigError, match="peak_flops"):
        base_train.run(cfg(base_dir, tmp_path / "neg", peak_flops=-1.0))

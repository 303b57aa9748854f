"""Checkpoints: atomic step folders, keep-last-N, skipping a corrupt latest, shape mismatch."""
import random

import pytest
import torch

from nanochat.recipes import base_train
from nanochat.checkpoint import (latest_valid_checkpoint, list_checkpoints, load_checkpoint, load_model,
                                 save_checkpoint, set_rng_state)
from nanochat.errors import ConfigError
from nanochat.gpt import GPTConfig, build_model
from nanochat.optim import build_optimizers
from nanochat.prepare import ensure_pretraining_data

VOCAB = 512


def _model_and_opts(depth=2):
    torch.manual_seed(0)
    model = build_model(GPTConfig.from_depth(depth, VOCAB, 32))
    opts = build_optimizers(model)
    x = torch.randint(0, VOCAB, (2, 32))
    model(x, x).backward()
    for o in opts:
        o.step()
    return model, opts


def _meta(model, tok_dir="", **kw):
    return {"model_config": model.config.to_dict(), "tokenizer_dir": str(tok_dir), "loader": {"0": {"pos": 3}}, **kw}


def test_save_load_round_trip_and_keep(tmp_path):
    model, opts = _model_and_opts()
    random.seed(123)
    torch.manual_seed(7)
    expected_py, expected_torch = random.random(), torch.rand(3)
    random.seed(123)
    torch.manual_seed(7)
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, opts, _meta(model), keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000002", "step_000003"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary folders left"
    ckpt = load_checkpoint(list_checkpoints(tmp_path)[-1])
    assert ckpt["meta"]["step"] == 3 and ckpt["meta"]["loader"] == {"0": {"pos": 3}}
    for k, v in model.state_dict().items():
        assert torch.equal(ckpt["model"][k], v)
    fresh = build_model(GPTConfig.from_depth(2, VOCAB, 32))
    fresh_opts = build_optimizers(fresh)
    for o, sd in zip(fresh_opts, ckpt["optim"]):
        o.load_state_dict(sd)
    muon_state = list(fresh_opts[1].state.values())[0]["momentum_buffer"]
    assert torch.equal(muon_state, list(opts[1].state.values())[0]["momentum_buffer"])
    random.seed(0)
    torch.manual_seed(0)
    set_rng_state(ckpt["rng"], ckpt["meta"]["python_rng"], torch.device("cpu"))
    assert random.random() == expected_py and torch.equal(torch.rand(3), expected_torch)
    # saving the same step again replaces it whole
    save_checkpoint(tmp_path, 3, model, opts, _meta(model, note="again"), keep=2)
    assert load_checkpoint(tmp_path / "step_000003")["meta"]["note"] == "again"


def test_corrupt_or_partial_latest_is_skipped(tmp_path):
    model, opts = _model_and_opts()
    save_checkpoint(tmp_path, 1, model, opts, _meta(model), keep=5)
    save_checkpoint(tmp_path, 2, model, opts, _meta(model), keep=5)
    latest = tmp_path / "step_000002" / "model.pt"
    latest.write_bytes(latest.read_bytes()[:100])  # truncated
    (tmp_path / ".tmp_step_000003_999").mkdir()    # a crash mid-save leaves only a hidden folder
    with pytest.warns(UserWarning, match="step_000002"):
        ckpt = latest_valid_checkpoint(tmp_path)
    assert ckpt["meta"]["step"] == 1
    with pytest.raises(ConfigError, match=str(latest)):
        load_checkpoint(tmp_path / "step_000002")
    (tmp_path / "step_000001" / "meta.json").write_text("{trunc")
    with pytest.warns(UserWarning):
        assert latest_valid_checkpoint(tmp_path) is None


def test_load_model_for_other_stages(tmp_path):
    from nanochat.tokenizer import Tokenizer
    tok = Tokenizer.train(["hello world, a tiny corpus"] * 20, VOCAB)
    tok.save(tmp_path / "tok")
    model, opts = _model_and_opts()
    save_checkpoint(tmp_path / "ckpts", 5, model, opts, _meta(model, tmp_path / "tok"))
    for where in (tmp_path / "ckpts", tmp_path / "ckpts" / "step_000005"):
        loaded, tok2, meta = load_model(where, "cpu")
        assert meta["step"] == 5 and not loaded.training
        assert tok2.encode("hello") == tok.encode("hello")
        x = torch.randint(0, VOCAB, (1, 16))
        assert torch.equal(loaded(x), model.eval()(x))
    with pytest.raises(ConfigError, match="nowhere"):
        load_model(tmp_path / "nowhere", "cpu")


@pytest.mark.slow
def test_checkpoint_of_another_shape_is_refused(tmp_path):
    base = tmp_path / "base"
    ensure_pretraining_data(base, num_shards=3, max_chars=400_000, row_group_size=16)
    common = dict(base_dir=str(base), out_dir=str(tmp_path / "run"), vocab_size=VOCAB, seq_len=32,
                  device_batch_size=2, num_steps=2, eval_tokens=256, num_shards=3, data_max_chars=400_000)
    base_train.run(base_train.BaseTrainConfig(depth=2, **common))
    ckpt_dir = tmp_path / "run" / "checkpoints" / "step_000002"
    before = {p.name: p.read_bytes() for p in ckpt_dir.iterdir()}
    with pytest.raises(ConfigError, match=rf"{ckpt_dir}.*model_config\.n_embd"):
        base_train.run(base_train.BaseTrainConfig(depth=3, **{**common, "num_steps": 4}))
    assert {p.name: p.read_bytes() for p in ckpt_dir.iterdir()} == before, "nothing may be overwritten"
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["step_000002"]

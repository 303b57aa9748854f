"""
A batch-size cache entry that cannot be used, whatever is wrong with it, is a warning naming the
file, a probe, and a rewritten valid entry: never a crash (issue: a binary entry failed the probe
stage and every rerun). Real files of garbage on disk, the real probe on a tiny model.
"""
from __future__ import annotations

import argparse
import json
import os

import pytest
import torch

from nanochat.training.batch_size.cache import cache_path, read_cache
from nanochat.training.batch_size.options import SearchOptions
from nanochat.training.batch_size.resolve import fallback_after_oom, key_inputs, resolve
from nanochat.gpt import GPTConfig, build_model
from nanochat.optim import build_optimizers

SEQ, VOCAB, ROWS = 32, 256, 2


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(GPTConfig.from_depth(1, VOCAB, SEQ))


def probe(model, cache_dir):
    return resolve(SearchOptions(model, build_optimizers, SEQ, ROWS * SEQ, 1, "cpu", cache_dir=cache_dir,
                                 memory_budget_gb=0, stop_gain=None))


def valid_entry(key: str) -> dict:
    return {"key": key, "device_batch_size": ROWS, "grad_accum": 1, "max_found": 3, "source": "probe", "trials": []}


GARBAGE = {
    "binary": lambda key: bytes(range(256)) * 8,
    "truncated": lambda key: json.dumps(valid_entry(key)).encode()[:37],
    "empty": lambda key: b"",
    "utf16": lambda key: json.dumps(valid_entry(key)).encode("utf-16"),
    "not_an_object": lambda key: b"[4, 1]",
    "null": lambda key: b"null",
    "string_sizes": lambda key: json.dumps(dict(valid_entry(key), device_batch_size="4")).encode(),
    "bool_size": lambda key: json.dumps(dict(valid_entry(key), device_batch_size=True, grad_accum=ROWS)).encode(),
    "float_size": lambda key: json.dumps(dict(valid_entry(key), device_batch_size=2.0)).encode(),
    "negative": lambda key: json.dumps(dict(valid_entry(key), device_batch_size=-4, grad_accum=-1)).encode(),
    "nan": lambda key: json.dumps(valid_entry(key)).replace('"max_found": 3', '"max_found": NaN').encode(),
    "max_found_text": lambda key: json.dumps(dict(valid_entry(key), max_found="5")).encode(),
    "huge_int": lambda key: json.dumps(valid_entry(key)).replace('"max_found": 3', '"max_found": ' + "9" * 10000).encode(),
    "deep_nesting": lambda key: b'{"device_batch_size": ' + b"[" * 200000 + b"]" * 200000 + b"}",
    "wrong_key": lambda key: json.dumps(dict(valid_entry(key), key="0" * 64)).encode(),
    "trials_not_list": lambda key: json.dumps(dict(valid_entry(key), trials="rm -rf /")).encode(),
    "trials_bad_items": lambda key: json.dumps(dict(valid_entry(key), trials=[1, None, {"ok": "yes"}])).encode(),
    "fallbacks_not_list": lambda key: json.dumps(dict(valid_entry(key), fallbacks=7)).encode(),
    "expires_text": lambda key: json.dumps(dict(valid_entry(key), expires_at="tomorrow")).encode(),
    "too_large": lambda key: json.dumps(dict(valid_entry(key), pad="x" * (5 << 20))).encode(),
    "pickle": lambda key: b"\x80\x04\x95\x1c\x00\x00\x00\x00\x00\x00\x00\x8c\x05posix\x94\x8c\x06system\x94\x93\x94.",
}


@pytest.mark.parametrize("kind", list(GARBAGE))
def test_garbage_entry_warns_names_the_file_probes_and_rewrites(kind, model, tmp_path):
    key = key_inputs(SearchOptions(model, build_optimizers, SEQ, ROWS * SEQ, 1, "cpu", memory_budget_gb=0,
                                   stop_gain=None)).key
    path = cache_path(tmp_path, key)
    path.write_bytes(GARBAGE[kind](key))
    with pytest.warns(UserWarning) as caught:
        bs, accum, source, info2 = probe(model, tmp_path)
    assert any(str(path) in str(w.message) for w in caught), [str(w.message) for w in caught]
    assert source == "probe" and bs * accum == ROWS and info2["cache_key"] == key
    entry = read_cache(tmp_path, key, ROWS)          # rewritten: valid again, and hit next time
    assert entry is not None and entry["device_batch_size"] == bs
    assert probe(model, tmp_path)[2] == "cache"


def test_sparse_but_valid_entry_is_a_hit(model, tmp_path):
    *_, info = probe(model, tmp_path)
    key = info["cache_key"]
    cache_path(tmp_path, key).write_text(json.dumps({"key": key, "device_batch_size": 1, "grad_accum": 2, "max_found": None}))
    bs, accum, source, info = probe(model, tmp_path)
    assert (bs, accum, source, info["max_found"], info["trials"]) == (1, 2, "cache", 0, [])


@pytest.mark.slow
def test_a_directory_or_device_at_the_entry_path_is_not_a_crash(model, tmp_path):
    *_, info = probe(model, tmp_path)
    path = cache_path(tmp_path, info["cache_key"])
    path.unlink()
    path.mkdir()                                      # cannot be read, cannot be replaced
    with pytest.warns(UserWarning, match=str(path)):
        bs, accum, source, _ = probe(model, tmp_path)
    assert source == "probe" and bs * accum == ROWS
    path.rmdir()
    os.symlink("/dev/zero", path)                     # endless bytes
    with pytest.warns(UserWarning, match=str(path)):
        assert probe(model, tmp_path)[2] == "probe"
    assert not path.is_symlink() and read_cache(tmp_path, info["cache_key"], ROWS) is not None


def test_fallback_after_oom_over_a_garbage_entry(tmp_path):
    key = "f" * 64
    cache_path(tmp_path, key).parent.mkdir(parents=True, exist_ok=True)
    cache_path(tmp_path, key).write_bytes(json.dumps(dict(valid_entry(key), fallbacks={"a": 1})).encode())
    with pytest.warns(UserWarning, match=str(cache_path(tmp_path, key))):
        assert fallback_after_oom(2, 1, key, tmp_path) == (1, 2)
    entry = read_cache(tmp_path, key, 2)
    assert (entry["device_batch_size"], entry["grad_accum"], len(entry["fallbacks"])) == (1, 2, 1)


@pytest.mark.slow
def test_probe_command_over_binary_garbage_exits_0_and_rewrites(tmp_path, capsys):
    from jobs.commands import probe as probe_command
    parser = argparse.ArgumentParser()
    probe_command.add_arguments(parser)
    argv = ["--depth", "1", "--seq-len", str(SEQ), "--vocab-size", str(VOCAB), "--total-batch-size", str(ROWS * SEQ),
            "--memory-budget-gb", "0.3", "--stop-gain", "-1", "--cache-dir", str(tmp_path), "--json"]
    assert probe_command.run(parser.parse_args(argv)) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    path = cache_path(tmp_path, first["cache_key"])
    path.write_bytes(os.urandom(64) + b"\xff\xfe")
    with pytest.warns(UserWarning, match=str(path)):
        assert probe_command.run(parser.parse_args(argv)) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["source"] == "probe" and again["batch_size"] == first["batch_size"]
    assert read_cache(tmp_path, first["cache_key"], ROWS) is not None

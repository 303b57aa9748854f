"""Pretraining shards, offline preparation, the rank-strided resumable loader, conversation data."""
import json
import multiprocessing as mp
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nanochat.errors import ConfigError
from nanochat.dataloader import conversation_loader, pretraining_loader
from nanochat.dataset import list_shards, open_shard, shard_name, split_shards, write_shard
from nanochat.prepare import data_dir, ensure_pretraining_data, ensure_tokenizer
from nanochat.conversations import read_conversations
from nanochat.synthetic import generate_conversations, write_jsonl
from nanochat.tokenizer import Tokenizer

VOCAB = 512
SMALL = 400_000  # chars: pydoc's topics only, quick to prepare


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    base = tmp_path_factory.mktemp("base")
    path = ensure_pretraining_data(base, num_shards=3, max_chars=SMALL, row_group_size=16)
    tok = ensure_tokenizer(base, VOCAB, data_path=path)
    return base, path, tok


def test_default_corpus_layout_and_idempotence(prepared):
    base, path, tok = prepared
    assert path == data_dir(base, num_shards=3, max_chars=SMALL)
    shards = list_shards(path)
    assert [p.name for p in shards] == [shard_name(i) for i in range(3)]
    train, val = split_shards(path)
    assert val.name == "shard_00002.parquet" and len(train) == 2
    pf = open_shard(shards[0])
    assert pf.schema_arrow.names == ["text"] and pf.num_row_groups > 1
    mtimes = [p.stat().st_mtime_ns for p in shards]
    assert ensure_pretraining_data(base, num_shards=3, max_chars=SMALL) == path
    assert [p.stat().st_mtime_ns for p in shards] == mtimes, "second call must not rewrite shards"
    assert ensure_tokenizer(base, VOCAB, data_path=path).encode("hello") == tok.encode("hello")
    # other settings get folders of their own beside these, and leave these untouched
    bigger = ensure_tokenizer(base, VOCAB * 2, data_path=path)
    assert bigger.get_vocab_size() == VOCAB * 2
    assert ensure_tokenizer(base, VOCAB, data_path=path).get_vocab_size() == VOCAB
    five = ensure_pretraining_data(base, num_shards=5, max_chars=SMALL)
    assert five != path and len(list_shards(five)) == 5
    assert [p.stat().st_mtime_ns for p in shards] == mtimes
    # a folder whose record disagrees with its name (hand-edited) is refused, not silently reused
    record = path / "prepared.json"
    record.write_text(record.read_text().replace('"num_shards": 3', '"num_shards": 7'))
    with pytest.raises(ConfigError, match="prepared.json"):
        ensure_pretraining_data(base, num_shards=3, max_chars=SMALL)


def test_corpus_is_deterministic(prepared, tmp_path):
    _, path, _ = prepared
    other = ensure_pretraining_data(tmp_path, num_shards=3, max_chars=SMALL, row_group_size=16)
    for a, b in zip(list_shards(path), list_shards(other)):
        assert pq.read_table(a).equals(pq.read_table(b))


def test_user_folder_of_txt_and_jsonl(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(5):
        (src / f"doc{i}.txt").write_text(f"plain text document number {i}\n" * 20)
    (src / "more.jsonl").write_text("".join(json.dumps({"text": f"json doc {i}"}) + "\n" for i in range(7)))
    path = ensure_pretraining_data(tmp_path / "base", source=str(src), num_shards=2)
    texts = [t for p in list_shards(path) for t in pq.read_table(p).column("text").to_pylist()]
    assert len(texts) == 12 and "json doc 3" in texts
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.jsonl").write_text('{"nottext": 1}\n')
    with pytest.raises(ConfigError, match="x.jsonl:1"):
        ensure_pretraining_data(tmp_path / "base2", source=str(bad))


def test_existing_shards_used_in_place_and_tokenizer_skips_val(tmp_path):
    src = tmp_path / "shards"
    prose = ["The quick brown fox jumps over the lazy dog. " * 30 + f"Story {i}." for i in range(40)]
    write_shard(src / shard_name(0), prose[:20], row_group_size=5)
    write_shard(src / shard_name(1), prose[20:], row_group_size=5)
    # the validation shard is full of a string that BPE would merge into one token if it saw it
    write_shard(src / shard_name(2), ["qqqqjjjj " * 2000] * 10, row_group_size=5)
    before = sorted(os.listdir(src))
    base = tmp_path / "base"
    assert ensure_pretraining_data(base, source=str(src)) == src
    assert sorted(os.listdir(src)) == before and not data_dir(base).exists(), "nothing may be written"
    tok = ensure_tokenizer(base, 300, data_path=src)
    assert len(tok.encode("qqqqjjjj")) >= 4, "the tokenizer was trained on the validation shard"


def test_missing_empty_corrupt_data(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError, match=str(missing)):
        list_shards(missing)
    with pytest.raises(ConfigError, match=str(missing)):
        ensure_pretraining_data(tmp_path, source=str(missing))
    empty_dir = tmp_path / "emptydir"
    empty_dir.mkdir()
    with pytest.raises(ConfigError, match=str(empty_dir)):
        list_shards(empty_dir)
    d = tmp_path / "d"
    write_shard(d / shard_name(0), ["some text"] * 4)
    write_shard(d / shard_name(1), [])
    with pytest.raises(ConfigError, match=rf"{d / shard_name(1)}.*empty"):
        open_shard(d / shard_name(1))
    (d / shard_name(1)).write_bytes(b"PAR1 this is not parquet at all")
    with pytest.raises(ConfigError, match=rf"{d / shard_name(1)}.*corrupt"):
        open_shard(d / shard_name(1))
    pq.write_table(pa.table({"body": ["x"]}), d / shard_name(1))
    with pytest.raises(ConfigError, match="'text' column"):
        open_shard(d / shard_name(1))
    tok = Tokenizer.train(["some text"] * 10, 300)
    with pytest.raises(ConfigError, match=shard_name(1)):
        pretraining_loader(list_shards(d), tok, 16)


def _prepare_in_child(base, q):
    from nanochat.prepare import ensure_pretraining_data, ensure_tokenizer
    path = ensure_pretraining_data(base, num_shards=3, max_chars=SMALL, row_group_size=16)
    tok = ensure_tokenizer(base, VOCAB, data_path=path)
    q.put((str(path), tok.encode("concurrent jobs")))


@pytest.mark.slow
def test_concurrent_preparation_is_safe(tmp_path):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_prepare_in_child, args=(str(tmp_path), q)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [q.get(timeout=180) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert results[0] == results[1]
    assert len(list_shards(results[0][0])) == 3


# -----------------------------------------------------------------------------
# The loader

def _rows(loader, n):
    return loader.next_step_rows(n)[0]


def test_loader_batches_and_bos(prepared):
    _, path, tok = prepared
    train, _ = split_shards(path)
    loader = pretraining_loader(train, tok, seq_len=32)
    x, y = loader.next_batch(4)
    assert x.shape == (4, 32) and y.shape == (4, 32) and x.dtype == torch.long
    assert x[0, 0] == tok.get_bos_token_id(), "the first document starts with <|bos|>"
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(y[:-1, -1], x[1:, 0])
    first_doc = pq.ParquetFile(train[0]).read_row_group(0).column("text")[0].as_py()
    ids = tok.encode(first_doc, prepend="<|bos|>")[:32]
    assert x[0, :len(ids)].tolist() == ids


def test_loader_rank_striding(prepared):
    _, path, tok = prepared
    train, _ = split_shards(path)
    r0 = pretraining_loader(train, tok, 32, rank=0, world_size=2)
    r1 = pretraining_loader(train, tok, 32, rank=1, world_size=2)
    g0, g1 = r0.streams[0].groups, r1.streams[0].groups
    all_groups = pretraining_loader(train, tok, 32).streams[0].groups
    assert not set(g0) & set(g1) and sorted(g0 + g1) == sorted(all_groups)
    assert g0 == all_groups[0::2] and g1 == all_groups[1::2]
    assert not torch.equal(_rows(r0, 2), _rows(r1, 2))
    # one process with two streams sees exactly what two ranks see, stream-major
    both = pretraining_loader(train, tok, 32, num_streams=2)
    r0 = pretraining_loader(train, tok, 32, rank=0, world_size=2)
    r1 = pretraining_loader(train, tok, 32, rank=1, world_size=2)
    for _ in range(3):
        assert torch.equal(_rows(both, 6), torch.cat([_rows(r0, 3), _rows(r1, 3)]))


def test_loader_resume_is_exact(prepared):
    _, path, tok = prepared
    train, _ = split_shards(path)
    a = pretraining_loader(train, tok, 64, num_streams=2)
    for _ in range(7):  # past row-group boundaries (row groups hold 16 documents)
        a.next_step_rows(8)
    state = json.loads(json.dumps(a.state_dict()))  # survives JSON (it goes into meta.json)
    assert {"shard", "row_group", "offset", "buffer"} <= set(state["0"])
    expected = [a.next_step_rows(8) for _ in range(5)]
    b = pretraining_loader(train, tok, 64, num_streams=2)
    b.load_state_dict(state)
    for rows, mask in expected:
        r, m = b.next_step_rows(8)
        assert torch.equal(r, rows) and torch.equal(m, mask)
    c = pretraining_loader(train, tok, 64, num_streams=4)
    with pytest.raises(ConfigError):
        c.load_state_dict(state)


def test_loader_wraps_epochs(tmp_path):
    tok = Tokenizer.train(["abc def ghi"] * 10, 300)
    write_shard(tmp_path / shard_name(0), ["alpha beta", "gamma delta"], row_group_size=1)
    loader = pretraining_loader([tmp_path / shard_name(0)], tok, 8)
    for _ in range(20):
        loader.next_batch(2)
    assert loader.streams[0].epoch > 0


# -----------------------------------------------------------------------------
# Conversations

def test_synthetic_conversations(prepared):
    _, _, tok = prepared
    convs = generate_conversations(400, seed=3, max_tokens=1024)
    assert convs == generate_conversations(400, seed=3, max_tokens=1024)
    assert convs != generate_conversations(400, seed=4, max_tokens=1024)
    kinds = set()
    for conv in convs:
        msgs = conv["messages"]
        assert [m["role"] for m in msgs] == ["user", "assistant"] * (len(msgs) // 2)
        for m in msgs[1::2]:
            parts = m["content"]
            kinds |= {p["type"] for p in parts}
            for i, p in enumerate(parts):
                if p["type"] == "python":
                    out = parts[i + 1]
                    assert out["type"] == "python_output"
                    from nanochat.calculator import evaluate  # the real tool agrees with the data
                    assert str(evaluate(p["text"])) == out["text"]
    assert kinds == {"text", "python", "python_output"}
    lengths = sorted(len(tok.render_conversation(c, 1 << 20)[0]) for c in convs)
    median, p99 = lengths[len(lengths) // 2], lengths[int(0.99 * len(lengths))]
    assert 100 <= median <= 600, median
    assert p99 >= 3 * median, (median, p99)  # long tail
    heavier = generate_conversations(400, seed=3, max_tokens=1024, tail_alpha=0.8)
    assert sum(map(len, (c["messages"] for c in heavier))) > sum(map(len, (c["messages"] for c in convs)))


def test_conversation_io(tmp_path):
    convs = generate_conversations(20, seed=0)
    convs.append({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
    path = write_jsonl(tmp_path / "c.jsonl", convs)
    assert read_conversations(path) == convs
    pq.write_table(pa.table({"messages": [json.dumps(c["messages"]) for c in convs]}), tmp_path / "c.parquet")
    assert read_conversations(tmp_path / "c.parquet") == convs
    (tmp_path / "bad.jsonl").write_text('{"messages": [{"role": "user", "content": "x"}]}\n{"oops": 1}\n')
    with pytest.raises(ConfigError, match="bad.jsonl:2"):
        read_conversations(tmp_path / "bad.jsonl")
    with pytest.raises(ConfigError, match="missing.jsonl"):
        read_conversations(tmp_path / "missing.jsonl")


def test_conversation_loader_masks(prepared):
    _, _, tok = prepared
    convs = generate_conversations(50, seed=1)
    loader = conversation_loader(convs, tok, 64, seed=0)
    x, y = loader.next_batch(4)
    assert x.shape == (4, 64)
    supervised = (y >= 0)
    assert 0 < supervised.float().mean() < 1
    # positions whose target is a user token are never supervised
    user_end = tok.encode_special("<|user_end|>")
    assert not supervised[y == user_end].any() and (x == user_end).any()
    assert (y[supervised] == tok.encode_special("<|assistant_end|>")).any()
    state = loader.state_dict()
    nxt = loader.next_batch(4)
    again = conversation_loader(convs, tok, 64, seed=0)
    again.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(nxt, again.next_batch(4)))

"""Datasets from a hub: a real HTTP server on 127.0.0.1 (tests/hub_server.py) answers what
huggingface_hub requests, with injected faults; the data stage on the local Slurm; the epochs guard."""
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
pytest_plugins = ["hub_server"]   # the `hub` fixture

from nanochat.errors import ConfigError, FetchError  # noqa: E402
from nanochat.fetch import PRETRAINING_SETS, fetch_pretraining_shards, fetched_shards, pretraining_dir, shard_files  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
FINEWEB = PRETRAINING_SETS["fineweb-edu-100b"]
WORDS = ("the cat sat on a mat while rain fell over quiet hills and rivers ran toward the sea "
         "students read books about history science music and the stars at night").split()


def make_shard(i: int, docs: int = 120) -> bytes:
    texts = [" ".join(WORDS[(i * 7 + j + k) % len(WORDS)] for k in range(60)) + f" doc {i}.{j}." for j in range(docs)]
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": texts}), buf, row_group_size=16)
    return buf.getvalue()


def parquet_bytes(rows: list[dict]) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


def add_fineweb(hub, n: int, faults: dict | None = None) -> list[str]:
    names = shard_files(FINEWEB, n)
    for i, name in enumerate(names):
        hub.add(FINEWEB.repo_id, name, make_shard(i), (faults or {}).get(name))
    return names


def test_fetch_shards_then_noop_without_network(hub, tmp_path):
    names = add_fineweb(hub, 8)
    s = fetch_pretraining_shards(tmp_path, "fineweb-edu-100b", 8, workers=4, backoff_s=0.01)
    dest = pretraining_dir(tmp_path, "fineweb-edu-100b")
    assert s["fetched"] == 8 and sorted(p.name for p in dest.glob("shard_*.parquet")) == names
    assert names[-1] == "shard_01822.parquet"   # the pinned validation shard sorts last
    for name in names:
        assert (dest / name).read_bytes() == hub.files[(FINEWEB.repo_id, name)]
    assert not (dest / ".staging").exists()
    before = len(hub.requests)
    again = fetch_pretraining_shards(tmp_path, "fineweb-edu-100b", 8)
    assert again["fetched"] == 0 and again["present"] == 8
    assert len(hub.requests) == before, "a second run with everything present must not touch the network"
    assert fetched_shards(tmp_path, "fineweb-edu-100b") == dest


# each fault and what must come of it: (fault queue for one file, fetched in the end?)
FAULTS = {
    "500 on the first try": (["500"], True),
    "connection cut mid-file": (["cut"], True),
    "truncated body": (["truncate"], True),
    "wrong checksum": (["corrupt"], True),
    "500 on every try": (["500!"], False),
    "truncated body every time": (["truncate!"], False),
    "wrong checksum every time": (["corrupt!"], False),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_fault_ends_complete_or_named_error(hub, tmp_path, fault):
    queue, ok = FAULTS[fault]
    names = add_fineweb(hub, 3, {shard_files(FINEWEB, 3)[1]: queue})
    bad = names[1]
    dest = pretraining_dir(tmp_path, "fineweb-edu-100b")
    if ok:
        fetch_pretraining_shards(tmp_path, "fineweb-edu-100b", 3, retries=3, backoff_s=0.01)
        assert (dest / bad).read_bytes() == hub.files[(FINEWEB.repo_id, bad)]
        if fault == "connection cut mid-file":   # resumed where it stopped, with a Range request
            gets = [p for m, p in hub.requests if m == "GET" and p.endswith(bad)]
            assert len(gets) == 2
    else:
        with pytest.raises(FetchError) as e:
            fetch_pretraining_shards(tmp_path, "fineweb-edu-100b", 3, retries=2, backoff_s=0.01)
        msg = str(e.value)
        assert str(dest / bad) in msg and "\n" not in msg
        assert not (dest / bad).exists(), "no half file in place"
        # the other files were verified and kept: a rerun fetches only the failed one
        others = [n for n in names if n != bad]
        assert all((dest / n).is_file() for n in others)
        hub.faults[(FINEWEB.repo_id, bad)] = []
        before = len([r for r in hub.requests if r[0] == "GET"])
        fetch_pretraining_shards(tmp_path, "fineweb-edu-100b", 3, backoff_s=0.01)
        gets = [p for m, p in hub.requests[:] if m == "GET"][before:]
        assert gets and all(p.endswith(bad) for p in gets)
    assert not list(dest.rglob("*.incomplete")) and not (dest / ".staging").exists()


def test_offline_training_names_missing_shard(hub, tmp_path, monkeypatch):
    names = add_fineweb(hub, 4)
    fetch_pretraining_shards(tmp_path, "fineweb-edu-100b", 4)
    dest = pretraining_dir(tmp_path, "fineweb-edu-100b")
    (dest / names[2]).unlink()
    with pytest.raises(ConfigError, match=rf"{names[2]}: missing; fetch it where the network is"):
        fetched_shards(tmp_path, "fineweb-edu-100b")
    with pytest.raises(ConfigError, match="shard_00000.parquet: missing"):
        fetched_shards(tmp_path / "elsewhere", "fineweb-edu-100b")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    n = len(hub.requests)
    with pytest.raises(ConfigError, match=rf"{names[2]}: missing.*HF_HUB_OFFLINE"):
        fetch_pretraining_shards(tmp_path, "fineweb-edu-100b", 4)
    assert len(hub.requests) == n


def test_conversation_sets_converted_and_mixed(hub, tmp_path):
    from nanochat.datasets_chat import CHAT_SETS, ensure_chat_set, read_mixture
    smol = CHAT_SETS["smoltalk"].split
    for i in range(4):   # four files the hub's listing names; a test split beside them is not read
        hub.add(smol.repo_id, f"data/train-{i:05d}-of-00004.parquet", parquet_bytes([
            {"messages": [{"role": "system", "content": "be kind"}, {"role": "user", "content": f"hi {i}"},
                          {"role": "assistant", "content": "hello"}]},
            {"messages": [{"role": "user", "content": "only one"}]}]), commit=smol.revision)   # malformed: skipped
    hub.add(smol.repo_id, "data/test-00000-of-00001.parquet", parquet_bytes([
        {"messages": [{"role": "user", "content": "held out"}, {"role": "assistant", "content": "yes"}]}]))
    mmlu, gsm8k = CHAT_SETS["mmlu"].split, CHAT_SETS["gsm8k"].split
    hub.add(mmlu.repo_id, "all/auxiliary_train-00000-of-00001.parquet", parquet_bytes(
        [{"question": "2+2?", "subject": "", "choices": ["3", "4", "5", "6"], "answer": 1}]), commit=mmlu.revision)
    hub.add(gsm8k.repo_id, "main/train-00000-of-00001.parquet", parquet_bytes(
        [{"question": "Tom has 2 apples and buys 3. How many?", "answer": "He has 2+3=<<2+3=5>>5 apples.\n#### 5"}]),
        ["500"], commit=gsm8k.revision)
    for name in ("smoltalk", "mmlu", "gsm8k"):
        ensure_chat_set(tmp_path, name, backoff_s=0.01)
    convs = read_mixture("smoltalk+mmlu+gsm8k", tmp_path)
    assert len(convs) == 4 + 1 + 1
    assert not any("held out" in c["messages"][0]["content"] for c in convs)
    mmlu_conv = next(c for c in convs if "2+2?" in c["messages"][0]["content"])
    assert mmlu_conv["messages"][1] == {"role": "assistant", "content": "B"}
    gsm = next(c for c in convs if "apples" in c["messages"][0]["content"])
    assert gsm["messages"][1]["content"][1:3] == [{"type": "python", "text": "2+3"},
                                                   {"type": "python_output", "text": "5"}]
    assert len(read_mixture("smoltalk:2+gsm8k", tmp_path)) == 3
    with pytest.raises(ConfigError, match=r"chat/mmlu.jsonl: missing; fetch it"):
        read_mixture("mmlu", tmp_path / "other")


def _pipeline(tmp_path: Path, data_args: dict, base_args: dict) -> Path:
    import yaml
    spec = {"name": "fetch-test", "results_dir": str(tmp_path / "results"),
            "cluster": {"cpus_per_task": 2, "time_min": 10},
            "defaults": {"args": {"depth": 1, "vocab_size": 300}},
            "stages": {"data": {"kind": "data", "args": data_args},
                       "base_train": {"kind": "base_train", "depends_on": ["data"],
                                      "args": {"seq_len": 32, "device_batch_size": 2, "total_batch_size": 64,
                                               "eval_every": 0, "eval_tokens": 128, "save_every": 0, **base_args}}}}
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _jobs(args, env_extra, timeout=600):
    env = {**os.environ, "PYTHONPATH": str(REPO), **env_extra}
    return subprocess.run([sys.executable, "-m", "jobs", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, env=env)


@pytest.mark.slow
def test_guard_refuses_1000_epochs_before_submitting(tmp_path):
    # a folder of 2 tiny shards (~2.6K tokens of training text) and a budget of ~1000 passes over it
    data = tmp_path / "tiny"
    data.mkdir()
    for i, n in ((0, 4), (1, 4)):
        (data / f"shard_{i:05d}.parquet").write_bytes(make_shard(i, n))
    from nanochat.dataset import shard_text_bytes
    tokens = shard_text_bytes(data / "shard_00000.parquet") / 4.8
    steps = int(1000 * tokens / 64)
    spec = _pipeline(tmp_path, {"conversations": []}, {"data_source": str(data), "num_steps": steps})
    spec.write_text(spec.read_text().replace("  data:\n    args:\n      conversations: []\n    kind: data\n", ""))
    spec.write_text(spec.read_text().replace("depends_on:\n    - data\n", "depends_on: []\n"))
    base = tmp_path / "work"
    r = _jobs(["submit", str(spec), "--executor", "local", "--run-id", "guarded"], {"NANOCHAT_BASE_DIR": str(base)})
    assert r.returncode == 2, r.stdout + r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "base_train" in err[0] and str(data) in err[0] and "epochs" in err[0]
    assert not (tmp_path / "results" / "guarded").exists() and not (base / "guarded").exists()


@pytest.mark.slow
def test_plan_artemis_offline():
    # ClimbMix by default, FineWeb-Edu one --set away; every set the evaluation stages read is in the plan
    r = _jobs(["data", "plan", "artemis-a100", "--json"], {"HF_HUB_OFFLINE": "1"}, timeout=300)
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout.strip().splitlines()[-1])
    d = plan["data_stages"][0]
    assert d["pretraining"] == "climbmix-400b" and d["revision"] == PRETRAINING_SETS["climbmix-400b"].revision
    assert 250 < d["num_shards"] < 280
    assert 0.5 < plan["training"]["base_train"]["epochs"] <= 1.0
    assert [e["set"] for e in d["eval_sets"]] == ["core", "arc_easy", "arc_challenge", "mmlu", "gsm8k", "humaneval"]
    assert {s["stage"] for s in plan["sources"] if s["from"] == "data"} == {"base_train", "mid_train", "sft",
                                                                              "base_eval", "chat_eval"}
    r = _jobs(["data", "plan", "artemis-a100", "--json", "--set", "data.pretraining=fineweb-edu-100b"],
              {"HF_HUB_OFFLINE": "1"}, timeout=300)
    plan = json.loads(r.stdout.strip().splitlines()[-1])
    d = plan["data_stages"][0]
    assert d["pretraining"] == "fineweb-edu-100b" and 200 < d["num_shards"] < 250
    assert plan["training"]["base_train"]["data"]["source"] == "fineweb-edu-100b"


@pytest.mark.slurm
@pytest.mark.slow
def test_data_stage_on_slurm_then_base_train(local_slurm, hub, tmp_path):
    add_fineweb(hub, 4)
    spec = _pipeline(tmp_path, {"pretraining": "fineweb-edu-100b", "num_shards": 4, "vocab_size": 300,
                                "backoff_s": 0.1},
                     {"data_source": "fineweb-edu-100b", "num_steps": 3})
    base = tmp_path / "work"
    r = _jobs(["submit", str(spec), "--executor", "slurm", "--wait", "--run-id", "fetched", "--json"],
              {"NANOCHAT_BASE_DIR": str(base), "HF_ENDPOINT": hub.endpoint}, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["stages"] == {"data": "COMPLETED", "base_train": "COMPLETED"}
    rows = {json.loads(p.read_text())["stage"]: json.loads(p.read_text())
            for p in (tmp_path / "results" / "fetched" / "rows").glob("*.json")}
    assert rows["base_train"]["data_epochs"] > 0
    dest = pretraining_dir(base, "fineweb-edu-100b")
    assert len(list(dest.glob("shard_*.parquet"))) == 4
    assert any(p.endswith("shard_01822.parquet") for m, p in hub.requests if m == "GET")


def test_data_stage_partition_overrides_cluster():
    from jobs import spec, submit
    pipeline = spec.load_pipeline(spec.resolve_pipeline_path("artemis-a100"),
                                  ["data.resources.partition=transfer", "data.resources.constraint=internet"])
    data = submit.slurm_parameters(pipeline, pipeline.stages["data"], [])
    base = submit.slurm_parameters(pipeline, pipeline.stages["base_train"], [])
    assert (data["partition"], data["constraint"]) == ("transfer", "internet")
    assert (base["partition"], base["constraint"]) == ("gpu", "a100-80gb")
    assert "gpus_per_node" not in data


def test_listing_500_is_retried(hub, tmp_path):
    add_fineweb(hub, 2)
    hub.api_faults = ["500", "500"]   # the first two API answers: the question "which commit is main?" is retried
    s = fetch_pretraining_shards(tmp_path, "fineweb-edu-100b", 2, backoff_s=0.01)
    assert s["fetched"] == 2 and s["revision"] == hub.commits[FINEWEB.repo_id]
    assert sum(1 for m, p in hub.requests if m == "GET" and "/revision/main" in p) == 3
    assert sum(1 for m, p in hub.requests if m == "POST") == 1


@pytest.mark.slow
def test_unreachable_hub_is_one_line_exit_1(tmp_path):
    # nothing listens on this port: a connection error is the work failing (exit 1), one line, no traceback
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    r = _jobs(["data", "fetch", "fineweb-edu-100b", "--shards", "2", "--retries", "2"],
              {"HF_ENDPOINT": f"http://127.0.0.1:{port}", "NANOCHAT_BASE_DIR": str(tmp_path), "HF_HUB_OFFLINE": "0"},
              timeout=300)
    assert r.returncode == 1, r.stderr
    err = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "karpathy/fineweb-edu-100b-shuffle" in err[0] and "Traceback" not in r.stderr
    assert not list((tmp_path / "data" / "fineweb-edu-100b").glob("shard_*"))

"""Every set a pipeline reads comes through the data stage: the evaluation sets (the CORE bundle by
its pinned sha256, the chat tasks' test splits from the hub's listing at pinned commits) fetched
from a real HTTP server on 127.0.0.1 (tests/hub_server.py) into <workdir>/eval_data and read by
the evaluation loaders; submit refuses a stage whose data nothing puts in place; revisions are
pinned; mid-training's epoch guard."""
import hashlib
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
pytest_plugins = ["hub_server"]   # the `hub` fixture

from jobs import hub_files  # noqa: E402
from nanochat.errors import ConfigError, FetchError  # noqa: E402
from nanochat.eval_data import EVAL_SETS, ensure_eval_set, eval_path  # noqa: E402
from nanochat.fetch import HUB_SPLITS, PRETRAINING_SETS, fetch_pretraining_shards, read_manifest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
EVAL_SPLITS = [k for k in HUB_SPLITS if k.endswith("/test")]


def _bundle(hub) -> dict:
    out = hub_files.populate(hub, {}, [], True)
    return {"url": out["url"], "sha256": out["sha256"]}


def test_data_stage_fetches_every_eval_set_and_the_loaders_read_them(hub, tmp_path, monkeypatch):
    from nanochat.recipes.data import DataConfig, run
    from nanochat.tasks import core, gsm8k, humaneval, multiple_choice
    from nanochat.tasks.common import find_task_file
    hub_files.populate(hub, {}, EVAL_SPLITS, False, rows=6)
    b = _bundle(hub)
    cfg = DataConfig(evals=list(EVAL_SETS), eval_bundle_url=b["url"], eval_bundle_sha256=b["sha256"],
                     base_dir=str(tmp_path), backoff_s=0.01)
    result = run(cfg)
    assert [s["set"] for s in result["sets"]] == list(EVAL_SETS) and all(s["fetched"] == s["files"] for s in result["sets"])
    data = tmp_path / "eval_data"
    assert len(multiple_choice.load(find_task_file(data, "arc_easy"))) == 6
    assert len(multiple_choice.load(find_task_file(data, "mmlu"))) == 6
    assert gsm8k.load(find_task_file(data, "gsm8k"))[0]["target"] is not None
    assert humaneval.load(find_task_file(data, "humaneval"))[0]["entry_point"]
    assert [t["label"] for t in core.load_suite(data / "eval_bundle")] == ["name_a_thing", "why_it_broke", "counting"]
    # each split's files were found in the hub's listing of its folder, at the pinned commit
    for key in EVAL_SPLITS:
        split = HUB_SPLITS[key]
        tree = f"/api/datasets/{split.repo_id}/tree/{split.revision}/{split.folder}?"
        assert any(m == "GET" and p.startswith(tree) for m, p in hub.requests)
    # a second run does no network work; the evaluation stages read offline and name a missing file
    n = len(hub.requests)
    again = run(cfg)
    assert len(hub.requests) == n and all(s["fetched"] == 0 for s in again["sets"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (data / "gsm8k.parquet").unlink()
    with pytest.raises(ConfigError, match=r"eval_data/gsm8k.parquet: task data not found.*--evals gsm8k"):
        find_task_file(data, "gsm8k")


def test_split_files_are_what_the_listing_names(hub, tmp_path):
    # three files of the test split beside the other splits and a README: the listing decides, not a name list
    split = HUB_SPLITS["arc_easy/test"]
    rows = hub_files.split_rows("arc_easy/test", 9)
    for i in range(3):
        hub.add(split.repo_id, f"ARC-Easy/test-{i:05d}-of-00003.parquet", hub_files._parquet(rows[i * 3:(i + 1) * 3]),
                commit=split.revision)
    for other in ("ARC-Easy/train-00000-of-00001.parquet", "ARC-Easy/validation-00000-of-00001.parquet",
                  "ARC-Challenge/test-00000-of-00001.parquet"):
        hub.add(split.repo_id, other, hub_files._parquet(rows[:1]), commit=split.revision)
    hub.add(split.repo_id, "README.md", b"# ai2_arc\n", commit=split.revision)
    info = ensure_eval_set(tmp_path, "arc_easy", backoff_s=0.01)
    assert info["rows"] == 9 and info["files"] == [f"test-{i:05d}-of-00003.parquet" for i in range(3)]
    gets = [p for m, p in hub.requests if m == "GET" and "/resolve/" in p]
    assert len(gets) == 3 and all("/ARC-Easy/test-" in p for p in gets)


def test_a_revision_other_than_the_pinned_one_is_not_fetched(hub, tmp_path):
    # the hub holds the set at another commit only: the pinned one is asked for, and refused, in one line
    split = HUB_SPLITS["humaneval/test"]
    for path, content in hub_files.split_files("humaneval/test", 4).items():
        hub.add(split.repo_id, path, content, commit="f" * 40)
    with pytest.raises(ConfigError) as e:
        ensure_eval_set(tmp_path, "humaneval", backoff_s=0.01)
    assert split.revision in str(e.value) and "\n" not in str(e.value)
    assert not eval_path(tmp_path, "humaneval").exists()


def test_branch_pinned_at_first_fetch_and_a_second_commit_refused(hub, tmp_path):
    ds = PRETRAINING_SETS["fineweb-edu-100b"]            # pinned as "main": resolved once, then recorded
    for path, content in hub_files.pretraining_shards(ds, 3, 20_000).items():
        hub.add(ds.repo_id, path, content)
    first = fetch_pretraining_shards(tmp_path, "fineweb-edu-100b", 2, backoff_s=0.01)
    commit = hub.commits[ds.repo_id]
    assert first["revision"] == commit and read_manifest(tmp_path / "data" / "fineweb-edu-100b")["revision"] == commit
    n = len(hub.requests)
    fetch_pretraining_shards(tmp_path, "fineweb-edu-100b", 3, backoff_s=0.01)   # one more shard, same commit
    later = hub.requests[n:]
    assert not any("/revision/" in p for _, p in later) and all(commit in p for m, p in later)
    with pytest.raises(ConfigError, match=r"would mix two versions"):
        fetch_pretraining_shards(tmp_path, "fineweb-edu-100b", 4, revision="e" * 40, backoff_s=0.01)


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, content in members.items():
            z.writestr(name, content)
    return buf.getvalue()


def test_bundle_checksum_and_members_outside_it(hub, tmp_path):
    good = hub_files.eval_bundle_zip()
    url = hub.add_url("bundle/eval_bundle.zip", good)
    with pytest.raises(FetchError) as e:      # the pinned checksum is not this file's
        ensure_eval_set(tmp_path, "core", url, "0" * 64, retries=2, backoff_s=0.01)
    assert "eval_bundle.zip" in str(e.value) and "sha256" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "eval_data" / "eval_bundle").exists()
    assert not (tmp_path / "data" / "hub" / "eval_bundle" / "eval_bundle.zip").exists()
    # a macOS zip's __MACOSX/ entries are left out; a member that climbs out is refused
    with zipfile.ZipFile(io.BytesIO(good)) as z:
        members = {n: z.read(n) for n in z.namelist()}
    mac = _zip({**members, "__MACOSX/eval_bundle/._core.yaml": b"junk"})
    info = ensure_eval_set(tmp_path, "core", hub.add_url("mac/eval_bundle.zip", mac), hashlib.sha256(mac).hexdigest())
    assert info["files"] == len(members) and not (tmp_path / "eval_data" / "__MACOSX").exists()
    evil = _zip({**members, "eval_bundle/../../evil.txt": b"x"})
    with pytest.raises(ConfigError, match=r"outside the bundle \(refused\)"):
        ensure_eval_set(tmp_path / "other", "core", hub.add_url("evil/eval_bundle.zip", evil),
                        hashlib.sha256(evil).hexdigest())
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "other" / "evil.txt").exists()


# ----------------------------------------------------------------------------- caught at submit

def _spec(tmp_path: Path, stages: dict) -> Path:
    import yaml
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"name": "needs", "results_dir": str(tmp_path / "results"),
                                    "defaults": {"args": {"depth": 1, "vocab_size": 300}}, "stages": stages}))
    return path


TRAIN = {"kind": "base_train", "args": {"seq_len": 32, "device_batch_size": 2, "total_batch_size": 64, "num_steps": 2}}


def _check(tmp_path, stages, monkeypatch):
    from jobs import data_plan, spec
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "work"))
    data_plan.check_pipeline_data(spec.load_pipeline(_spec(tmp_path, stages)), log=lambda *a: None)


@pytest.mark.parametrize("stages, needle", [
    ({"train": TRAIN, "eval": {"kind": "chat_eval", "depends_on": ["train"], "args": {"init_from": "train"}}},
     r"stages.eval.args.tasks: \S+/work/eval_data/arc_easy.parquet: missing, and no `data` stage before eval fetches it "
     r"\(add arc_easy to a data stage's evals"),
    ({"train": TRAIN, "core": {"kind": "base_eval", "depends_on": ["train"], "args": {"init_from": "train"}}},
     r"stages.core.args.data_dir: \S+/eval_data/eval_bundle/core.yaml: missing.*add core to a data stage's evals"),
    ({"train": TRAIN, "mid": {"kind": "mid_train", "depends_on": ["train"], "args": {"init_from": "train",
                                                                                      "data_path": "smoltalk+gsm8k"}}},
     r"stages.mid.args.data_path: \S+/data/chat/smoltalk.jsonl: missing.*add smoltalk to a data stage's conversations"),
    ({"train": {**TRAIN, "args": {**TRAIN["args"], "data_source": "climbmix-400b"}}},
     r"stages.train.args.data_source: \S+/data/climbmix-400b: missing.*data fetch climbmix-400b --shards N"),
    ({"data": {"kind": "data", "args": {"evals": ["arc_easy"]}}, "train": TRAIN,
      "eval": {"kind": "chat_eval", "depends_on": ["train"], "args": {"init_from": "train", "tasks": "arc_easy"}}},
     r"stages.eval.args.tasks: .*arc_easy.parquet: missing; stage data fetches arc_easy but eval does not depend on it"),
])
def test_a_stage_whose_data_nothing_puts_in_place_is_refused(tmp_path, monkeypatch, stages, needle):
    with pytest.raises(ConfigError, match=needle) as e:
        _check(tmp_path, stages, monkeypatch)
    assert "\n" not in str(e.value)


def test_data_fetched_by_an_earlier_data_stage_passes(tmp_path, monkeypatch):
    _check(tmp_path, {"data": {"kind": "data", "args": {"evals": ["arc_easy", "core"]}},
                      "train": {**TRAIN, "depends_on": ["data"]},
                      "eval": {"kind": "chat_eval", "depends_on": ["train"], "args": {"init_from": "train", "tasks": "arc_easy"}},
                      "core": {"kind": "base_eval", "depends_on": ["train"], "args": {"init_from": "train"}}}, monkeypatch)


def test_submit_refuses_the_cluster_pipeline_without_its_eval_sets(tmp_path):
    # artemis-a100 whose data stage forgets the chat tasks' sets: exit 2, one line, nothing created
    env = {**os.environ, "PYTHONPATH": str(REPO), "NANOCHAT_BASE_DIR": str(tmp_path / "work"),
           "NANOCHAT_RESULTS_DIR": str(tmp_path / "results"), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "jobs", "submit", "artemis-a100", "--executor", "local",
                        "--set", "data.evals=[core]"], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    print(r.stderr)
    assert r.returncode == 2, r.stdout + r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "stages.chat_eval.args.tasks" in err[0] and "eval_data/arc_easy.parquet: missing" in err[0]
    assert not (tmp_path / "results").exists() and not list((tmp_path / "work").rglob("*"))


def test_data_source_may_name_the_data_stage(tmp_path):
    from jobs import spec
    stages = {"data": {"kind": "data", "args": {"pretraining": "climbmix-400b", "num_shards": 3}},
              "train": {**TRAIN, "depends_on": ["data"], "args": {**TRAIN["args"], "data_source": "data"}}}
    p = spec.load_pipeline(_spec(tmp_path, stages), ["data.pretraining=fineweb-edu-100b"])
    assert p.stages["train"].args["data_source"] == "fineweb-edu-100b"
    with pytest.raises(ConfigError, match=r"stages.train.args.data_source: stage 'data' must be in depends_on"):
        spec.load_pipeline(_spec(tmp_path, {**stages, "train": {**stages["train"], "depends_on": []}}))


# ----------------------------------------------------------------------------- mid-training's epoch guard

def test_mid_train_epoch_guard_at_submit_and_at_its_start(tmp_path, monkeypatch):
    from nanochat.recipes import mid_train
    from nanochat.datasets_chat import conversation_chars, converted_path
    from nanochat.prepare import ensure_pretraining_data, ensure_tokenizer
    work = tmp_path / "work"
    convs = [{"messages": [{"role": "user", "content": f"what is {i} plus {i}?"},
                           {"role": "assistant", "content": f"{2 * i}"}]} for i in range(40)]
    out = converted_path(work, "gsm8k")
    out.parent.mkdir(parents=True)
    out.write_text("".join(json.dumps(c) + "\n" for c in convs))
    out.with_suffix(".json").write_text(json.dumps({"set": "gsm8k", "conversations": 40,
                                                    "chars": sum(conversation_chars(c) for c in convs)}))
    mid = {"kind": "mid_train", "depends_on": ["train"],
           "args": {"init_from": "train", "data_path": "gsm8k", "seq_len": 32, "total_batch_size": 64, "num_steps": 5000}}
    with pytest.raises(ConfigError, match=r"mid: would make [\d,]+ epochs over gsm8k.*max_data_epochs=16"):
        _check(tmp_path, {"train": TRAIN, "mid": mid}, monkeypatch)
    # the stage itself, where the sets are fetched by the same run: the same guard on what it loaded
    data = ensure_pretraining_data(tmp_path / "base", num_shards=3, max_chars=400_000, row_group_size=16)
    tok = ensure_tokenizer(tmp_path / "base", 300, data_path=data)
    cfg = mid_train.MidTrainConfig(data_path="gsm8k", seq_len=32, total_batch_size=64, num_steps=5000)
    with pytest.raises(ConfigError, match=r"mid_train: would make [\d,]+ epochs over gsm8k"):
        mid_train._data_epochs(cfg, 1, convs, tok)
    assert mid_train._data_epochs(mid_train.MidTrainConfig(data_path="gsm8k", seq_len=32, total_batch_size=64,
                                                           num_steps=2), 1, convs, tok) < 1

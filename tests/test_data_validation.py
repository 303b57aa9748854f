"""User-supplied data is checked by `submit` before any job is submitted (jobs/spec.py), with the
same check the stage's loader runs (nanochat/conversations.py, nanochat/prepare.py): one line
naming the file and its 1-based line, exit 2, nothing written."""
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from jobs import spec
from nanochat.errors import ConfigError
from nanochat.conversations import check_conversation_file, read_conversations

REPO = Path(__file__).resolve().parent.parent
GOOD = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
BAD_ROLE = {"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]}


def jsonl(path: Path, objs) -> Path:
    path.write_text("".join((json.dumps(o) if not isinstance(o, str) else o) + "\n" for o in objs))
    return path


@pytest.mark.parametrize("obj,words", [
    (BAD_ROLE, "message 2 has role 'user', expected 'assistant'"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "message 1 has role 'assistant', expected 'user'"),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "x"}]},
     "a system message must be followed by a user message"),
    ({"messages": [{"role": "user", "content": ["a"]}, {"role": "assistant", "content": "x"}]},
     "message 1 (user) content must be a string"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": [{"type": "code", "text": "x"}]}]},
     "message 2 (assistant) part 1 must be {type, text}"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": [{"type": "text", "text": 3}]}]},
     "message 2 (assistant) part 1"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 7}]},
     "message 2 (assistant) content must be a string or a list"),
    ({"messages": []}, "non-empty 'messages' list"),
    ([1, 2], "expected a JSON object"),
    ("{not json", "invalid JSON"),
])
def test_bad_conversation_names_file_and_1_based_line(tmp_path, obj, words):
    # line 1 good, line 2 blank (still counted), line 3 good, line 4 bad
    path = jsonl(tmp_path / "c.jsonl", [GOOD, "", GOOD, obj, GOOD])
    for check in (check_conversation_file, read_conversations):
        with pytest.raises(ConfigError) as e:
            check(path)
        assert str(e.value).startswith(f"{path}:4: ") and words in str(e.value), str(e.value)
        assert "\n" not in str(e.value)


def test_good_conversations_with_system_and_tool_parts_pass(tmp_path):
    tool = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2*3?"},
                         {"role": "assistant", "content": [{"type": "python", "text": "2*3"},
                                                           {"type": "python_output", "text": "6"},
                                                           {"type": "text", "text": "6"}]}]}
    path = jsonl(tmp_path / "c.jsonl", [GOOD, tool])
    assert check_conversation_file(path) == 2 and read_conversations(path) == [GOOD, tool]
    with pytest.raises(ConfigError, match="no conversations"):
        check_conversation_file(jsonl(tmp_path / "empty.jsonl", [""]))


def test_parquet_rows_are_1_based(tmp_path):
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"messages": [json.dumps(GOOD["messages"]), json.dumps(BAD_ROLE["messages"])]}), path)
    with pytest.raises(ConfigError, match=r"c.parquet: row 2: message 2 has role 'user'"):
        check_conversation_file(path)
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ConfigError, match="junk.parquet: corrupt parquet file"):
        check_conversation_file(tmp_path / "junk.parquet")


def test_the_loaders_give_the_same_error_as_submit(tmp_path):
    """One validator: the stage, if it ever ran on the file, would fail with the line submit names."""
    from nanochat.recipes import mid_train, sft
    path = jsonl(tmp_path / "c.jsonl", [GOOD, GOOD, GOOD, BAD_ROLE])
    with pytest.raises(ConfigError) as at_submit:
        check_conversation_file(path)
    with pytest.raises(ConfigError) as in_sft:
        sft.load_conversations(path)
    with pytest.raises(ConfigError) as in_mid:
        mid_train.load_mixture(mid_train.MidTrainConfig(data_path=str(path), num_synthetic=0), 256)
    assert str(at_submit.value) == str(in_sft.value) == str(in_mid.value) == \
        f"{path}:4: message 2 has role 'user', expected 'assistant' (roles alternate, user first)"


def test_bad_text_folder_and_shard_folder_fail_spec_validation(tmp_path):
    text = tmp_path / "text"
    text.mkdir()
    (text / "a.txt").write_text("some prose")
    jsonl(text / "b.jsonl", [{"text": "ok"}, {"txt": "typo"}])
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "shard_00000.parquet").write_bytes(b"not parquet")
    (shards / "shard_00001.parquet").write_bytes(b"not parquet")
    for source, words in ((text, f"{text / 'b.jsonl'}:2: expected a JSON object with a 'text' field"),
                          (shards, f"{shards / 'shard_00000.parquet'}: corrupt shard"),
                          (tmp_path / "nowhere", "data_source folder not found")):
        raw = {"stages": {"base": {"kind": "base_train", "args": {"data_source": str(source)}}}}
        with pytest.raises(ConfigError) as e:
            spec.parse_pipeline(raw, "p.yaml")
        assert str(e.value).startswith("p.yaml: stages.base.args.data_source: ") and words in str(e.value), str(e.value)


def test_a_variant_data_path_is_checked_too(tmp_path):
    good, bad = jsonl(tmp_path / "good.jsonl", [GOOD]), jsonl(tmp_path / "bad.jsonl", [GOOD, BAD_ROLE])
    raw = {"stages": {"sft": {"kind": "sft", "args": {"data_path": str(good)},
                              "variants": [{"name": "a"}, {"name": "b", "args": {"data_path": str(bad)}}]}}}
    with pytest.raises(ConfigError, match=rf"p.yaml: stages.sft.variants\[1\].args.data_path: {bad}:2: message 2"):
        spec.parse_pipeline(raw, "p.yaml")


# -----------------------------------------------------------------------------
# Through the real command: exit 2, one line, no run folder, no job

def run_submit(tmp_path, pipeline: dict, *extra):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(pipeline))
    env = dict(os.environ, NANOCHAT_RESULTS_DIR=str(tmp_path / "results"), NANOCHAT_BASE_DIR=str(tmp_path / "work"))
    out = subprocess.run([sys.executable, "-m", "jobs", "submit", str(path), *extra], capture_output=True,
                         text=True, env=env, cwd=REPO, timeout=300)
    return path, out


def _nothing_written(tmp_path):
    return not (tmp_path / "results").exists() and not (tmp_path / "work").exists()


@pytest.mark.slow
@pytest.mark.parametrize("executor", ["local", "slurm"])
def test_submit_refuses_bad_sft_data_before_submitting_anything(tmp_path, request, executor):
    if executor == "slurm":
        request.getfixturevalue("local_slurm")
    name = f"badsft{uuid.uuid4().hex[:8]}"    # Slurm job names are <pipeline>.<stage>: ours alone
    data = jsonl(tmp_path / "chat.jsonl", [GOOD, GOOD, "", BAD_ROLE])
    pipeline = {"name": name, "stages": {
        "first": {"kind": "noop", "args": {"seconds": 30}},      # would run for a while before sft
        "sft": {"kind": "sft", "depends_on": ["first"], "args": {"data_path": str(data)}}}}
    path, out = run_submit(tmp_path, pipeline, "--executor", executor)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [
        f"error: {path}: stages.sft.args.data_path: {data}:4: message 2 has role 'user', expected 'assistant' "
        "(roles alternate, user first)"]
    assert _nothing_written(tmp_path)
    if executor == "slurm":   # accounting records every submission, even one cancelled at once
        jobs = subprocess.run(["sacct", "-n", "-X", "-S", "now-1hours", "--name", f"{name}.first,{name}.sft",
                               "-o", "JobID"], capture_output=True, text=True, check=True).stdout.split()
        assert jobs == [], f"jobs were submitted: {jobs}"


@pytest.mark.parametrize("name", ["a/b", "..", "../../etc", ""])
def test_submit_refuses_variant_names_that_are_not_path_safe(tmp_path, name):
    pipeline = {"name": "badvariant", "stages": {
        "a": {"kind": "noop", "variants": [{"name": "ok"}, {"name": name}]}}}
    path, out = run_submit(tmp_path, pipeline, "--executor", "local")
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: stages.a.variants[1].name: "), lines
    assert _nothing_written(tmp_path)


@pytest.mark.parametrize("name", ["a/b", "..", "../x"])
def test_a_grid_name_that_is_not_path_safe_is_refused(tmp_path, name):
    """A grid's name names its row files (rows/<name>__<job>.json), as a variant name does."""
    from jobs.array import load_grid
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump({"name": name, "grid": {"x": [1, 2]}}))
    with pytest.raises(ConfigError, match=rf"{path}: name .*no '/' or '..'"):
        load_grid(path)


def test_an_init_from_path_must_hold_a_checkpoint_at_submit(tmp_path):
    """init_from naming a stage is that stage's future checkpoints; a path must be one now."""
    raw = {"stages": {"bench": {"kind": "inference_bench", "args": {"init_from": str(tmp_path / "nope")}}}}
    with pytest.raises(ConfigError, match=rf"p.yaml: stages.bench.args.init_from: {tmp_path / 'nope'}: checkpoint folder not found"):
        spec.parse_pipeline(raw, "p.yaml")
    (tmp_path / "empty").mkdir()
    raw["stages"]["bench"]["args"]["init_from"] = str(tmp_path / "empty")
    with pytest.raises(ConfigError, match="no valid checkpoint in this folder"):
        spec.parse_pipeline(raw, "p.yaml")
    ok = {"stages": {"a": {"kind": "noop"}, "b": {"kind": "noop", "depends_on": ["a"], "args": {"init_from": "a"}}}}
    spec.parse_pipeline(ok, "p.yaml")


def test_a_line_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"messages": "\xff\xfe"}\n')
    with pytest.raises(ConfigError, match=rf"{path}:2: not UTF-8 text"):
        check_conversation_file(path)

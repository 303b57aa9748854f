"""Evaluation recipes on a real (tiny, untrained) checkpoint and the repository's fixture sets."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanochat import evaluate
from nanochat.recipes import base_eval, chat_eval
from nanochat.checkpoint import load_model, save_checkpoint
from nanochat.errors import ConfigError
from nanochat.gpt import GPTConfig, build_model
from nanochat.tasks import core, gsm8k, multiple_choice
from nanochat.tasks.common import FIXTURES_DIR, load_records
from nanochat.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("evalckpt")
    texts = [l for p in sorted(FIXTURES_DIR.rglob("*.jsonl")) for l in p.read_text().splitlines()]
    tok = Tokenizer.train(texts * 2, 400)
    tok.save(out / "tok")
    torch.manual_seed(0)
    cfg = GPTConfig(sequence_len=512, vocab_size=tok.get_vocab_size(), n_layer=1, n_head=2, n_kv_head=2, n_embd=32)
    save_checkpoint(out / "ckpt", 1, build_model(cfg, "cpu"), [],
                    {"model_config": cfg.to_dict(), "tokenizer_dir": str(out / "tok")})
    return out / "ckpt"


def test_gsm8k_final_number():
    assert gsm8k.extract_answer("so 3 * 5 = <<3*5=15>>15\n#### 1,015") == "1015"
    assert gsm8k.extract_answer("#### 2 then #### -7.") == "-7"
    assert gsm8k.extract_answer("no answer") is None
    ex = {"target": "7"}
    assert gsm8k.is_correct(ex, "It is 7.\n#### 7") and not gsm8k.is_correct(ex, "#### 8")


def test_fixture_sets_load_in_public_formats():
    assert len(multiple_choice.load(FIXTURES_DIR / "arc_easy.jsonl")) >= 20
    mmlu = multiple_choice.load(FIXTURES_DIR / "mmlu.parquet")       # parquet, like cais/mmlu
    assert len(mmlu) >= 20 and all(0 <= e["answer"] < 4 for e in mmlu)
    suite = core.load_suite(FIXTURES_DIR / "eval_bundle")
    assert {t["type"] for t in suite} == set(core.TYPES)
    assert core.centered(0.25, 25.0) == 0.0 and core.centered(1.0, 25.0) == 1.0


def test_bad_task_file_names_file_and_line(tmp_path):
    bad = tmp_path / "gsm8k.jsonl"
    bad.write_text('{"question": "q", "answer": "#### 1"}\n{oops\n')
    with pytest.raises(ConfigError, match=r"gsm8k.jsonl:2"):
        load_records(bad)
    # the same JSONL reader as the conversation files: a bad byte is named by its line, not a crash
    bad.write_bytes(b'{"question": "q", "answer": "#### 1"}\n{"question": "\xff"}\n')
    with pytest.raises(ConfigError, match=r"gsm8k.jsonl:2: not UTF-8"):
        load_records(bad)


def test_multiple_choice_batched_equals_one_by_one(ckpt):
    """The batched, right-padded forward scores exactly as one prompt at a time would."""
    model, tok, _ = load_model(ckpt, "cpu")
    examples = multiple_choice.load(FIXTURES_DIR / "arc_easy.jsonl")[:10]
    info = evaluate.compute_init("cpu")
    cfg = chat_eval.ChatEvalConfig(batch_size=4)
    batched = evaluate._multiple_choice(examples, model, tok, cfg, info)
    single = 0
    with torch.no_grad():
        for e in examples:
            p = tok.render_for_completion({"messages": [{"role": "user", "content": multiple_choice.render_prompt(e)}]})
            logits = model(torch.tensor([p]))[0, -1]
            letters = multiple_choice.letter_token_ids(tok, e["letters"])
            single += int(int(logits[letters].argmax()) == e["answer"])
    assert batched == single


@pytest.mark.slow
def test_chat_eval_end_to_end(ckpt):
    cfg = chat_eval.ChatEvalConfig(init_from=str(ckpt), data_dir="fixtures", max_per_task=3, max_new_tokens=8,
                                  num_samples=2, temperature=1.0, compare_broadcast=True, device_type="cpu",
                                  sandbox_timeout_s=5)
    rows = {r["variant"]: r for r in chat_eval.run(cfg)}
    assert set(rows) == {"arc_easy", "arc_challenge", "mmlu", "gsm8k", "gsm8k.broadcast", "humaneval",
                         "humaneval.broadcast", "ChatCORE"}
    for name in ("arc_easy", "mmlu", "gsm8k", "humaneval"):
        r = rows[name]
        assert r["num_examples"] == 3 and 0 <= r["accuracy"] <= 1 and r["examples_per_s"] > 0
    assert rows["gsm8k"]["k"] == 2 and rows["gsm8k.broadcast"]["first_token"] == "broadcast"
    assert rows["arc_easy"]["chance"] == 0.25
    main = [rows[t] for t in ("arc_easy", "arc_challenge", "mmlu", "gsm8k", "humaneval")]
    assert rows["ChatCORE"]["centered"] == pytest.approx(sum(r["centered"] for r in main) / 5)
    from nanochat.sandbox import isolation
    assert rows["humaneval"]["isolation"] == rows["humaneval.broadcast"]["isolation"] == isolation().label


def test_humaneval_refused_where_no_sandbox_the_other_tasks_run(ckpt):
    """No bwrap on PATH: HumanEval's row is SKIPPED with the one-line reason (also on stderr, exit 1),
    ARC runs, ChatCORE is over ARC alone; --allow-unsafe-code scores it and says how."""
    env = {"PATH": "/nonexistent", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HOME": os.environ.get("HOME", "/")}
    cmd = [sys.executable, "-m", "jobs", "eval", str(ckpt), "--tasks", "arc_easy,humaneval", "--data-dir", "fixtures",
           "--max-per-task", "2", "--max-new-tokens", "4", "--json"]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 1, p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])
    rows = {r["variant"]: r for r in out["rows"]}
    assert rows["arc_easy"]["state"] == "COMPLETED" and rows["humaneval"]["state"] == "SKIPPED"
    assert "bubblewrap (bwrap) is not installed" in rows["humaneval"]["error"] == out["error"]
    assert out["error"] in p.stderr and rows["ChatCORE"]["tasks"] == "arc_easy"
    p = subprocess.run(cmd + ["--allow-unsafe-code"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    rows = {r["variant"]: r for r in json.loads(p.stdout.strip().splitlines()[-1])["rows"]}
    assert rows["humaneval"]["state"] == "COMPLETED" and rows["humaneval"]["isolation"].startswith("none")


def test_base_eval_core(ckpt):
    rows = base_eval.run(base_eval.BaseEvalConfig(init_from=str(ckpt), data_dir="fixtures", max_per_task=4, device_type="cpu"))
    assert [r["variant"] for r in rows] == ["name_a_thing", "why_it_broke", "counting", "CORE"]
    assert all(r["num_examples"] == 4 for r in rows[:3])


@pytest.mark.slow
def test_cli_bad_input_is_one_line_exit_2(ckpt, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for extra, needle in ((["--tasks", "arc_hard"], "unknown task 'arc_hard'"),
                          (["--tasks", "gsm8k", "--data-dir", str(tmp_path)], "gsm8k.parquet: task data not found")):
        p = subprocess.run([sys.executable, "-m", "jobs", "eval", str(ckpt), *extra], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 2, p.stderr
        assert needle in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


CHILD = """
import json, sys
from nanochat.recipes import chat_eval
cfg = chat_eval.ChatEvalConfig(**json.loads(sys.argv[1]))
print("ROWS " + json.dumps(chat_eval.run(cfg), default=str), flush=True)
"""


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process(ckpt):
    from tests.test_distributed import _spawn
    cfg = dict(init_from=str(ckpt), data_dir="fixtures", tasks="arc_easy,mmlu,gsm8k", max_per_task=5,
               max_new_tokens=6, device_type="cpu")

    def rows(out):
        return {r["variant"]: r for r in json.loads([l for l in out.splitlines() if l.startswith("ROWS ")][-1][5:])}
    one = rows(_spawn(CHILD, [json.dumps(cfg)], 1)[0])
    two = [rows(o) for o in _spawn(CHILD, [json.dumps(cfg)], 2)]
    for task in ("arc_easy", "mmlu", "gsm8k"):
        assert two[0][task]["world_size"] == 2 and two[0][task]["num_examples"] == 5   # 3 + 2 examples, summed
        assert two[0][task]["accuracy"] == two[1][task]["accuracy"] == one[task]["accuracy"]


def test_pipeline_refuses_bad_eval_args_before_submitting():
    from jobs.spec import load_pipeline
    for setting, key in (("chat_eval.tasks=arc_hard", "stages.chat_eval.args.tasks"),
                         ("chat_eval.first_token=shared", "stages.chat_eval.args.first_token"),
                         ("chat_eval.temperature=0.0", "stages.chat_eval.args.temperature")):
        with pytest.raises(ConfigError, match=key):
            load_pipeline(REPO / "pipelines" / "smoke.yaml", [setting])


def test_report_card_in_summary_and_comparison():
    from jobs.report.markdown import report_card_md
    from jobs.report.pairs import eval_figures
    from jobs.report.rows import rows_frame
    from jobs.rows import make_row
    rows = [make_row(run_id="r", stage="chat_eval", kind="chat_eval", variant=t, state="COMPLETED",
                     extra={"accuracy": acc, "num_examples": 4, "eval_seconds": 2.0, "examples_per_s": 2.0,
                            "pass_at_k": pk, "k": 2, "first_token": ft})
            for t, acc, pk, ft in (("gsm8k", 0.5, 0.5, "independent"), ("gsm8k.broadcast", 0.25, 0.25, "broadcast"))]
    df = rows_frame(rows)
    card = "\n".join(report_card_md(df))
    assert "## Report card" in card and "near chance" in card and "gsm8k.broadcast" in card
    figs = eval_figures(df)
    assert figs[("chat_eval", "gsm8k", "pass_at_k")] == 0.5 and figs[("chat_eval", "gsm8k.broadcast", "accuracy")] == 0.25


@pytest.mark.slow
def test_cli_eval_prints_rows_and_json(ckpt):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "jobs", "eval", str(ckpt), "--tasks", "core", "--data-dir", "fixtures",
                        "--max-per-task", "2", "--json"], cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = json.loads(p.stdout.strip().splitlines()[-1])["rows"]
    assert [r["variant"] for r in rows][-1] == "CORE" and "examples_per_s" in rows[0]
    assert "name_a_thing" in p.stdout


@pytest.mark.slow
def test_independent_first_token_raises_pass_at_k(tmp_path, capsys):
    """The first-token fix measured as quality. A model that learned two answers per question, half
    starting "Yes" (then the right number) and half "No" (a wrong one): with the broadcast first
    token all k samples share one start, so pass@k stays near pass@1 (1/2); with independent first
    tokens pass@k approaches 1 - (1/2)^k. Same model, same seeds, only first_token differs."""
    questions = [(f"What is {a} plus {b}?", a + b) for a, b in ((12, 5), (7, 9), (21, 4), (3, 30), (15, 15), (8, 6))]
    convs = []
    for q, n in questions:
        convs.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": f"Yes #### {n}"}]})
        convs.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": f"No #### {n + 1}"}]})
    tok = Tokenizer.train([json.dumps(c) for c in convs] * 20 + ["0123456789 #"] * 20, 300)
    tok.save(tmp_path / "tok")
    seqs = [tok.render_conversation(c)[0] for c in convs]
    T = max(map(len, seqs))
    x = torch.zeros(len(seqs), T - 1, dtype=torch.long)
    y = torch.full((len(seqs), T - 1), -1, dtype=torch.long)
    for i, s in enumerate(seqs):
        x[i, :len(s) - 1], y[i, :len(s) - 1] = torch.tensor(s[:-1]), torch.tensor(s[1:])
    torch.manual_seed(0)
    cfg = GPTConfig(sequence_len=64, vocab_size=tok.get_vocab_size(), n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
    model = build_model(cfg, "cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(150):
        loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_checkpoint(tmp_path / "ckpt", 1, model, [], {"model_config": cfg.to_dict(), "tokenizer_dir": str(tmp_path / "tok")})
    with open(tmp_path / "gsm8k.jsonl", "w") as f:
        for q, n in questions:
            f.write(json.dumps({"question": q, "answer": f"{n}\n#### {n}"}) + "\n")
    rows = {r["variant"]: r for r in chat_eval.run(chat_eval.ChatEvalConfig(
        init_from=str(tmp_path / "ckpt"), data_dir=str(tmp_path), tasks="gsm8k", num_samples=4, temperature=1.0,
        top_k=0, max_new_tokens=8, compare_broadcast=True, device_type="cpu"))}
    ind, bc = rows["gsm8k"], rows["gsm8k.broadcast"]
    with capsys.disabled():
        print(f"\nfirst token   pass@1  pass@4  (6 problems, 4 samples each, temperature 1)\n"
              f"independent   {ind['pass_at_1']:.3f}   {ind['pass_at_k']:.3f}\n"
              f"broadcast     {bc['pass_at_1']:.3f}   {bc['pass_at_k']:.3f}")
    assert 0.2 < ind["pass_at_1"] < 0.8 and 0.2 < bc["pass_at_1"] < 0.8    # the model learned both starts
    assert ind["pass_at_k"] > bc["pass_at_k"]
    assert bc["pass_at_k"] == pytest.approx(bc["pass_at_1"])    # broadcast: the samples all start alike

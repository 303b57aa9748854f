"""
The inference engine: the KV cache reproduces full recomputation, samples are independent and
seeded, overflow is an error that leaves the cache intact, tool calls are answered by the
calculator, and the chat command and inference benchmark run end to end. Tiny models only.
"""
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanochat.engine import DecodeStep, Engine, KVCache, KVCacheOverflow, generate_naive, sample_next_token
from nanochat.gpt import GPTConfig, build_model
from nanochat.recipes.inference_bench import InferenceBenchConfig, randomize_weights, run as run_bench, summary
from nanochat.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(vocab=512, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, seq=128, seed=0):
    """A GQA model with every matrix random: nanochat's init zeroes the output projections, under
    which attention (and so the cache) could not influence the logits at all."""
    model = build_model(GPTConfig(sequence_len=seq, vocab_size=vocab, n_layer=n_layer, n_head=n_head,
                                  n_kv_head=n_kv_head, n_embd=n_embd))
    randomize_weights(model, seed)
    return model.eval()


def random_prompt(n, vocab=512, seed=1):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# -----------------------------------------------------------------------------
# KV cache correctness

@pytest.mark.parametrize("static", [False, True])
@torch.inference_mode()
def test_cached_logits_equal_full_recompute_at_every_step(static):
    model = tiny_model()
    rows = 2
    seq = torch.randint(0, 512, (rows, 40), generator=torch.Generator().manual_seed(3))
    prompt_len = 12
    cache = KVCache.for_model(model, rows, 40, static=static)
    logits = model(seq[:, :prompt_len], kv_cache=cache)
    if static:
        cache.pos += prompt_len   # a static cache's owner advances the host count
    full = model(seq[:, :prompt_len])
    torch.testing.assert_close(logits, full, atol=1e-5, rtol=1e-5)
    for t in range(prompt_len, 40):
        step_logits = model(seq[:, t:t + 1], kv_cache=cache)[:, -1]
        if static:
            cache.pos += 1
        full_logits = model(seq[:, :t + 1])[:, -1]
        torch.testing.assert_close(step_logits, full_logits, atol=1e-5, rtol=1e-5)
        assert cache.pos == t + 1
    assert cache.positions.tolist() == ([40, 40] if static else [0, 0])


@torch.inference_mode()
def test_chunk_after_prefix_uses_the_right_mask():
    model = tiny_model()
    seq = torch.randint(0, 512, (1, 30), generator=torch.Generator().manual_seed(4))
    cache = KVCache.for_model(model, 1, 30)
    model(seq[:, :10], kv_cache=cache)
    chunk = model(seq[:, 10:25], kv_cache=cache)          # 15 tokens at once after a prefix of 10
    torch.testing.assert_close(chunk, model(seq[:, :25])[:, 10:], atol=1e-5, rtol=1e-5)


def test_static_decode_reads_only_the_filled_length_buckets(monkeypatch):
    # what the captured graph is recorded from: each step attends to the filled positions rounded up to
    # a bucket, not to the whole buffer, and greedy tokens and logits stay the eager cache's
    import torch.nn.functional as F
    from nanochat.engine import check_decode
    monkeypatch.setattr(DecodeStep, "ATTEND_BUCKET", 8, raising=False)
    key_lengths = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda q, k, v, *a, **kw: key_lengths.append((q.size(2), k.size(2))) or sdpa(q, k, v, *a, **kw))
    model, prompt = tiny_model(n_layer=2), random_prompt(13)
    def greedy(decode):
        engine = Engine(model, decode=decode)
        return [c for c, _ in engine.generate(prompt, num_samples=3, max_tokens=30, temperature=0.0)]
    eager = greedy("eager")
    key_lengths.clear()
    static = greedy("static")
    assert static == eager
    steps = [k for q, k in key_lengths if q == 1][::2]  # one decode step's key length (both layers alike)
    filled = range(len(prompt) + 1, len(prompt) + 30)   # the 29 decode steps, this step's key included
    assert steps == [min(-(-n // 8) * 8, len(prompt) + 30) for n in filled]  # 16, 16, 16, 24, ..., 40, 43
    assert max(steps) == 43 and min(steps) == 16
    result = check_decode(model, prompt, 30, num_samples=2, decode="static")
    assert result["ok"], result["max_logit_diff"]


@torch.inference_mode()
def test_decode_step_matches_and_copies_the_prefill_to_every_row():
    model = tiny_model()
    prompt = torch.tensor([random_prompt(9)])
    prefill = KVCache.for_model(model, 1, 20)
    model(prompt, kv_cache=prefill)
    step = DecodeStep(model, batch_size=3, max_len=20)
    step.cache.load_prefix(prefill)
    nxt = torch.tensor([[5], [6], [7]])
    logits = step(nxt)
    full = model(torch.cat([prompt.expand(3, -1), nxt], dim=1))[:, -1]
    torch.testing.assert_close(logits, full, atol=1e-5, rtol=1e-5)
    assert step.cache.pos == 10 and step.cache.positions.tolist() == [10, 10, 10]


@pytest.mark.parametrize("num_samples", [1, 3])
def test_greedy_outputs_identical_across_variants(num_samples):
    model = tiny_model(n_layer=3)
    prompt = random_prompt(15)
    reference = generate_naive(model, prompt, 25, num_samples=num_samples)
    for decode in ("eager", "static"):
        engine = Engine(model, decode=decode)
        columns = [c for c, _ in engine.generate(prompt, num_samples=num_samples, max_tokens=25, temperature=0.0)]
        assert [list(row) for row in zip(*columns)] == reference, decode


def test_seeded_sampling_matches_naive_sampling():
    # Same seed, same draws: with one sample the cached engine samples exactly what recomputation samples.
    model = tiny_model()
    prompt = random_prompt(10)
    reference = generate_naive(model, prompt, 20, temperature=1.0, top_k=50, seed=7)
    columns = [c for c, _ in Engine(model).generate(prompt, max_tokens=20, temperature=1.0, top_k=50, seed=7)]
    assert [c[0] for c in columns] == reference[0]


# -----------------------------------------------------------------------------
# Multi-sample: independent first tokens, reproducible with a seed

def flat_model():
    model = tiny_model()
    with torch.no_grad():
        model.lm_head.weight.zero_()        # every logit 0: the next-token distribution is uniform
    return model


@pytest.mark.parametrize("decode", ["eager", "static"])
def test_samples_draw_their_own_first_token_and_the_seed_reproduces_them(decode):
    engine = Engine(flat_model(), decode=decode)
    prompt = random_prompt(8)

    def first_tokens(seed):
        return next(engine.generate(prompt, num_samples=16, max_tokens=4, temperature=1.0, seed=seed))[0]

    a = first_tokens(123)
    assert len(set(a)) > 1            # the broadcast bug gives 16 copies of one token
    assert first_tokens(123) == a     # seeded: repeatable
    assert first_tokens(124) != a
    # the original bug, kept as the benchmark's baseline: one draw copied to every row
    broadcast = next(engine.generate(prompt, num_samples=16, max_tokens=1, temperature=1.0, seed=123,
                                     first_token="broadcast"))[0]
    assert len(set(broadcast)) == 1


def test_sampling_filters():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]] * 64)
    g = torch.Generator().manual_seed(0)
    assert sample_next_token(logits, g, temperature=0.0).view(-1).tolist() == [1] * 64
    assert sample_next_token(logits, g, temperature=1.0, top_k=1).view(-1).tolist() == [1] * 64
    top2 = set(sample_next_token(logits, g, temperature=1.0, top_k=2).view(-1).tolist())
    assert top2 <= {1, 3} and len(top2) == 2
    # nucleus at 0.5: token 1 alone carries ~0.64 of the mass
    assert sample_next_token(logits, g, temperature=1.0, top_p=0.5).view(-1).tolist() == [1] * 64
    nucleus = set(sample_next_token(logits, g, temperature=1.0, top_p=0.9).view(-1).tolist())
    assert nucleus <= {1, 3, 2} and 1 in nucleus


# -----------------------------------------------------------------------------
# Overflow

@torch.inference_mode()
def test_cache_overflow_is_an_error_that_leaves_the_cache_intact():
    model = tiny_model()
    seq = torch.tensor([random_prompt(10)])
    cache = KVCache.for_model(model, 1, 8)
    model(seq[:, :6], kv_cache=cache)
    with pytest.raises(KVCacheOverflow, match="8 allocated"):
        model(seq[:, 6:9], kv_cache=cache)
    assert cache.pos == 6
    # the refused insert wrote nothing: the remaining room still decodes correctly
    logits = model(seq[:, 6:8], kv_cache=cache)
    torch.testing.assert_close(logits, model(seq[:, :8])[:, 6:], atol=1e-5, rtol=1e-5)
    with pytest.raises(KVCacheOverflow):
        model(seq[:, 8:9], kv_cache=cache)

    step = DecodeStep(model, batch_size=2, max_len=3)
    step(torch.tensor([[1], [2]]))
    step(torch.tensor([[1], [2]]))
    step(torch.tensor([[1], [2]]))
    with pytest.raises(KVCacheOverflow):
        step(torch.tensor([[1], [2]]))


def test_engine_refuses_lengths_past_the_rotary_table():
    model = tiny_model(seq=16)          # rotary table: 160 positions
    engine = Engine(model)
    with pytest.raises(ValueError, match="rotary"):
        next(engine.generate(random_prompt(100), max_tokens=61))
    with pytest.raises(ValueError):
        next(engine.generate([], max_tokens=4))
    assert len(list(engine.generate(random_prompt(100), max_tokens=60, use_tools=False, stop_at_end=False))) == 60


# -----------------------------------------------------------------------------
# Tool use and chat, with a tiny model that memorised one tool-using conversation

CONVERSATION = {"messages": [
    {"role": "user", "content": "What is 6*7?"},
    {"role": "assistant", "content": [
        {"type": "text", "text": "Let me compute. "},
        {"type": "python", "text": "6*7"},
        {"type": "python_output", "text": "41"},      # deliberately wrong: the engine must force 42
        {"type": "text", "text": " Done."},
    ]},
]}


@pytest.fixture(scope="module")
def memorised(tmp_path_factory):
    torch.set_num_threads(1)
    text = ["The quick brown fox jumps over the lazy dog. What is 6*7? Let me compute. Done. " * 20,
            "numbers 0123456789 + - * / ( ) . , " * 10]
    tokenizer = Tokenizer.train(text, vocab_size=300)
    ids, _ = tokenizer.render_conversation(CONVERSATION)
    torch.manual_seed(0)
    model = build_model(GPTConfig(sequence_len=128, vocab_size=tokenizer.get_vocab_size(), n_layer=2, n_head=2,
                                  n_kv_head=2, n_embd=64))
    x, y = torch.tensor([ids[:-1]]), torch.tensor([ids[1:]])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(80):
        loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    model.eval()
    return model, tokenizer


def test_tool_call_output_is_forced_with_mask_zero(memorised):
    model, tokenizer = memorised
    engine = Engine(model, tokenizer)
    prompt = tokenizer.render_for_completion(CONVERSATION)
    steps = list(engine.generate(prompt, num_samples=2, max_tokens=60, temperature=0.0))
    tokens = [c[0] for c, _ in steps]
    masks = [m[0] for _, m in steps]
    assert [c[1] for c, _ in steps] == tokens            # both rows decoded alike (greedy)
    sp = tokenizer.encode_special
    end = tokens.index(sp("<|python_end|>"))
    assert tokenizer.decode(tokens[tokens.index(sp("<|python_start|>")) + 1:end]) == "6*7"
    forced = [sp("<|output_start|>")] + tokenizer.encode("42") + [sp("<|output_end|>")]
    assert tokens[end + 1:end + 1 + len(forced)] == forced
    assert masks[end + 1:end + 1 + len(forced)] == [0] * len(forced)
    assert masks[:end + 1] == [1] * (end + 1)
    assert tokens[-1] == sp("<|assistant_end|>")         # generation stopped at the end token

    results, result_masks = engine.generate_batch(prompt, num_samples=2, max_tokens=60, temperature=0.0)
    reply = results[0][len(prompt):]
    assert sp("<|assistant_end|>") not in reply and results[1] == results[0]
    assert tokenizer.decode(reply).startswith("Let me compute. <|python_start|>6*7<|python_end|><|output_start|>42")
    assert len(result_masks[0]) == len(results[0])


def test_without_tools_nothing_is_forced(memorised):
    model, tokenizer = memorised
    steps = list(Engine(model, tokenizer).generate(tokenizer.render_for_completion(CONVERSATION), max_tokens=40,
                                                   temperature=0.0, use_tools=False))
    assert all(m == [1] for _, m in steps)


class _Lines(io.StringIO):
    def isatty(self):
        return False


def test_chat_loop_streams_replies_and_stops_at_quit(memorised):
    from jobs.commands.chat import chat_loop
    model, tokenizer = memorised
    out = io.StringIO()
    rc = chat_loop(Engine(model, tokenizer), tokenizer, _Lines("What is 6*7?\n/quit\nnever read\n"), out,
                   temperature=0.0, max_tokens=60)
    assert rc == 0
    text = out.getvalue()
    assert "User: What is 6*7?" in text
    assert "Assistant: Let me compute. <|python_start|>6*7<|python_end|><|output_start|>42<|output_end|>" in text
    assert "never read" not in text


@pytest.mark.slow
def test_chat_command_with_a_checkpoint_and_piped_stdin(memorised, tmp_path):
    from nanochat.checkpoint import save_checkpoint
    model, tokenizer = memorised
    tokenizer.save(tmp_path / "tokenizer")
    save_checkpoint(tmp_path / "checkpoints", 80, model, [],
                    {"model_config": model.config.to_dict(), "tokenizer_dir": str(tmp_path / "tokenizer")})
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "jobs", "chat", str(tmp_path / "checkpoints"), "--temperature", "0",
                           "--max-tokens", "60"], input="What is 6*7?\n/clear\nWhat is 6*7?\n", text=True,
                          capture_output=True, cwd=REPO, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("<|output_start|>42<|output_end|>") == 2     # EOF ends the session
    bad = subprocess.run([sys.executable, "-m", "jobs", "chat", str(tmp_path / "missing")], input="", text=True,
                         capture_output=True, cwd=REPO, env=env, timeout=120)
    assert bad.returncode == 2 and "missing" in bad.stderr


# -----------------------------------------------------------------------------
# The benchmark recipe and command (behaviour only; speed is for `python -m jobs bench inference`)

def test_inference_bench_rows(tmp_path):
    cfg = InferenceBenchConfig(depth=2, vocab_size=512, prompt_len=8, new_tokens=6, num_samples=2,
                               diversity_samples=16, out_dir=str(tmp_path))
    rows = run_bench(cfg)
    by = {r["variant"]: r for r in rows}
    assert set(by) == {"naive", "kv-eager", "kv-static", "kv-graph", "kv-fast"}   # no -xN: already 2 rows
    assert by["kv-graph"]["state"] == "SKIPPED" and "CUDA" in by["kv-graph"]["skip_reason"]
    assert by["naive"]["state"] == "COMPLETED" and "greedy_identical" not in by["naive"]
    for name in ("naive", "kv-eager", "kv-static"):
        r = by[name]
        assert r["state"] == "COMPLETED" and r.get("greedy_identical", True) is True
        assert r["tokens_per_s"] > 0 and r["ttft_s"] > 0 and r["tpot_s"] > 0
        assert r["bandwidth_util"] is None      # no roofline for a CPU
        assert r["first_token_distinct"] > 1
    s = json.loads((tmp_path / "inference_bench.json").read_text())["summary"]
    assert s["greedy_identical"] is True
    assert s["speedup_kv_vs_naive"] == pytest.approx(by["kv-eager"]["speedup_vs_naive"])
    assert summary(rows)["speedup_graph_vs_naive"] is None


@pytest.mark.slow
def test_bench_inference_command_prints_json_last(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "jobs", "bench", "inference", "--depth", "2", "--vocab-size", "512",
           "--prompt-len", "6", "--new-tokens", "5", "--num-samples", "2", "--repeats", "2", "--threads", "1", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["command"] == "bench inference" and result["speedup_kv_vs_naive"] > 0
    assert result["variants"]["kv-eager"]["greedy_identical"] is True
    assert result["repeats"] == 2 and result["threads"] == 1
    bad = subprocess.run(cmd[:-1] + ["--new-tokens", "1"], capture_output=True, text=True, cwd=REPO, env=env, timeout=180)
    assert bad.returncode == 2 and "new_tokens" in bad.stderr


def test_inference_bench_from_a_checkpoint(memorised, tmp_path):
    from nanochat.checkpoint import save_checkpoint
    model, tokenizer = memorised
    tokenizer.save(tmp_path / "tokenizer")
    save_checkpoint(tmp_path / "checkpoints", 80, model, [],
                    {"model_config": model.config.to_dict(), "tokenizer_dir": str(tmp_path / "tokenizer")})
    rows = run_bench(InferenceBenchConfig(init_from=str(tmp_path / "checkpoints"), prompt_len=8, new_tokens=6,
                                          num_samples=2, diversity_samples=8))
    assert all(r["weights"].startswith("checkpoint") and r["n_params"] == model.num_params() for r in rows)
    assert summary(rows)["greedy_identical"] is True


# -----------------------------------------------------------------------------
# The decode check: a broken cache fails the bench and the stage, whatever dtype the timed runs use

@pytest.fixture
def position_blind_static_cache(monkeypatch):
    """Break the static cache (the CUDA-graph step's cache) the way a capture bug would: every decode
    step takes its rotary position from 0 instead of the row's cache position."""
    rotary = KVCache.rotary

    def blind(self, cos, sin, T):
        if not self.static:
            return rotary(self, cos, sin, T)
        self.check_room(T)
        idx = self._arange[:T][None, :].expand(self.batch_size, T)
        return cos[0, idx], sin[0, idx]
    monkeypatch.setattr(KVCache, "rotary", blind)


def test_check_decode_passes_a_correct_cache():
    from nanochat.engine import check_decode
    model = tiny_model()
    for decode in ("eager", "static"):
        good = check_decode(model, random_prompt(10), 12, num_samples=2, decode=decode)
        assert good["ok"] and good["max_logit_diff"] < 1e-4 and good["first_bad_step"] is None
    with pytest.raises(ValueError, match="fp32"):
        check_decode(tiny_model().to(torch.bfloat16), random_prompt(10), 4)


def test_check_decode_catches_a_position_blind_static_cache(position_blind_static_cache):
    from nanochat.engine import check_decode
    bad = check_decode(tiny_model(), random_prompt(10), 12, num_samples=2, decode="static")
    # the prefill (step 0) has no cache position to ignore; the first decode step is wrong
    assert not bad["ok"] and bad["first_bad_step"] == 1 and bad["max_logit_diff"] > 0.1


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_inference_bench_fails_a_broken_static_cache_and_reports_no_speedup(position_blind_static_cache, dtype):
    from nanochat.recipes.inference_bench import DecodeMismatch
    # bfloat16: the timed runs in bf16 as on a GPU, where greedy equality with naive proves nothing;
    # the check still runs in fp32 and must catch the broken cache.
    cfg = InferenceBenchConfig(depth=2, vocab_size=512, prompt_len=8, new_tokens=6, num_samples=2,
                               diversity_samples=4, dtype=dtype)
    with pytest.raises(DecodeMismatch, match="kv-static: decode check failed"):
        run_bench(cfg)
    rows = run_bench(cfg, raise_on_mismatch=False)
    by = {r["variant"]: r for r in rows}
    assert by["kv-static"]["state"] == "FAILED" and by["kv-static"]["decode_check"] == "FAIL"
    assert "speedup_vs_naive" not in by["kv-static"] and "tokens_per_s" not in by["kv-static"]
    assert by["kv-eager"]["state"] == "COMPLETED" and by["kv-eager"]["decode_check"] == "pass"
    assert by["kv-eager"]["weights_dtype"] == dtype
    s = summary(rows)
    assert s["decode_check"] is False and s["variants"]["kv-static"]["state"] == "FAILED"


def test_bench_inference_command_exits_1_on_a_broken_cache(position_blind_static_cache, capsys):
    from jobs.cli import main
    rc = main(["bench", "inference", "--depth", "2", "--vocab-size", "512", "--prompt-len", "6", "--new-tokens", "5",
                               "--num-samples", "2", "--dtype", "bfloat16", "--json"])
    out = capsys.readouterr()
    assert rc == 1 and "kv-static" in out.err
    result = json.loads(out.out.strip().splitlines()[-1])
    assert result["decode_check"] is False and result["variants"]["kv-static"]["state"] == "FAILED"


def test_inference_bench_stage_fails_on_a_broken_cache(position_blind_static_cache, tmp_path, monkeypatch):
    import yaml
    from jobs import runs, spec, stages
    monkeypatch.setenv("NANOCHAT_RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "work"))
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"name": "p", "stages": {"infer": {"kind": "inference_bench", "args": {
        "depth": 2, "vocab_size": 512, "prompt_len": 6, "new_tokens": 5, "num_samples": 2, "diversity_samples": 4,
        "dtype": "bfloat16"}}}}))
    run, run_dir = runs.create_run(spec.load_pipeline(path), "broken", "local", [])
    with pytest.raises(Exception, match="decode check failed"):
        stages.run_stage(run_dir, "infer")
    rows = [json.loads(p.read_text()) for p in (run_dir / "rows").glob("*.json")]
    assert [r["state"] for r in rows] == ["FAILED"] and "kv-static" in rows[0]["error"]
    assert not stages.marker_path(run_dir, "infer").exists()
    detail = json.loads((Path(run["workdir"]) / "broken" / "infer" / "inference_bench.json").read_text())
    assert {r["variant"]: r["state"] for r in detail["rows"]}["kv-static"] == "FAILED"


# -----------------------------------------------------------------------------
# CUDA only: the captured decode step (runs where a GPU is present; skipped here)

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_captured_decode_matches_eager_on_cuda():
    from nanochat.engine import prepare_for_inference
    model = tiny_model(n_layer=3).to("cuda")
    prompt = random_prompt(20)
    # fp32 first: the captured step must reproduce the eager cache exactly as on a CPU
    eager = [c for c, _ in Engine(model, decode="eager").generate(prompt, num_samples=3, max_tokens=30, temperature=0.0)]
    engine = Engine(model, decode="graph")
    for _ in range(2):   # the second call replays the graph captured by the first
        graph = [c for c, _ in engine.generate(prompt, num_samples=3, max_tokens=30, temperature=0.0)]
        assert graph == eager
    assert len(engine._steps) == 1
    with torch.inference_mode():
        prefill = KVCache.for_model(model, 1, 21)
        model(torch.tensor([prompt], device="cuda"), kv_cache=prefill)
        step = DecodeStep(model, batch_size=2, max_len=64, capture=True)
        step.cache.load_prefix(prefill)
        nxt = torch.tensor([[5], [6]], device="cuda")
        full = model(torch.cat([torch.tensor([prompt] * 2, device="cuda"), nxt], dim=1))[:, -1]
        torch.testing.assert_close(step(nxt), full, atol=1e-3, rtol=1e-3)
    # bf16 weights: runs, and every sample gets its own first token
    prepare_for_inference(model)
    first = next(Engine(model).generate(prompt, num_samples=16, max_tokens=2, temperature=1.0))[0]
    assert len(set(first)) > 1

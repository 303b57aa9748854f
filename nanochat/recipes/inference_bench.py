"""
Inference benchmark (stage kind inference_bench): the same prompt decoded by
- naive:     no cache; a full forward over the whole sequence for every new token (O(T^2))
- kv-eager:  the KV cache, eager decode
- kv-static: the static-cache decode step run eagerly (CPU only: the CUDA-graph code path, uncaptured)
- kv-graph:  the static-cache decode step captured as a CUDA graph (CUDA only; skipped elsewhere)
- kv-fast:   the eager KV decode in the fast precision the device allows (engine.decode_precision_route:
             int8 weights with bf16 activations on a CPU with AMX or AVX512-BF16); skipped where that
             is the timed dtype anyway. Its quality guard: over `quality_prompts` random prompts, each
             decoded greedily for new_tokens in fp32, the share of positions where the fast model's
             greedy token (fed the fp32 tokens so far) equals fp32's, and the fp32 run's length of
             exact free-running agreement.
- kv-eager-xN: kv-eager with N = multi_samples rows (samples) at once: rows share every weight read,
             so tokens/s should grow nearly N-fold; speedup_vs_1_sample is the ratio to kv-eager.
All timed variants run interleaved, repeat by repeat (best of `repeats`), so a loaded machine slows
each alike; speedup_vs_eager is each one's tokens/s over kv-eager's from this same run.
One result row per variant: tokens/s, time to first token, time per output token, memory-bandwidth
use against the roofline, whether its greedy output equals the naive one, and the speedup over
naive measured in this same run.

Before anything is timed, every cached variant passes the decode check in fp32 (engine.check_decode):
its logits at every step against a full forward without a cache, at full fp32 matmul precision. The
timed runs use bf16 weights on CUDA, where naive and cached greedy outputs may part on a near-tie,
so their greedy equality proves nothing there; the fp32 check does. A variant that fails it is not
timed (a broken static cache or CUDA graph must not report a speedup), its row is FAILED, and run()
raises DecodeMismatch after writing the rows: the stage fails. Without init_from the model is freshly built from `depth` with
random weights: enough for speed, and the rows say so.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from nanochat.device import autodetect_device_type, device_name, peak_memory_bytes, synchronize
from nanochat.errors import ConfigError
from nanochat.files import atomic_write_json, git_commit
from nanochat.peaks import device_peaks
from nanochat.engine import (DECODE_PRECISIONS, INT8_CPU_ONLY, Engine, check_decode, decode_precision_route, full_fp32_matmuls,
                             generate_naive, prepare_for_inference)
from nanochat.gpt import GPTConfig, build_model


@dataclass
class InferenceBenchConfig:
    base_dir: str = ""
    out_dir: str = ""
    init_from: str = ""          # checkpoint folder; "" -> a fresh random model of `depth`
    device_type: str = ""        # "" = auto
    depth: int = 8
    vocab_size: int = 65536      # fresh model only (nanochat's vocabulary size)
    prompt_len: int = 50
    new_tokens: int = 100
    num_samples: int = 1         # rows decoded together in the timed runs
    diversity_samples: int = 16  # samples drawn at temperature 1 to count distinct first tokens
    seed: int = 42
    repeats: int = 1             # timed runs per variant; the fastest counts (shared machines are noisy)
    threads: int = 0             # CPU: torch threads for the run (0 = leave torch's default)
    dtype: str = ""              # weights in the timed runs: "" = bfloat16 on CUDA, float32 elsewhere
    precision: str = "auto"      # kv-fast's weights: auto | fp32 | bf16 | int8 (engine.decode_precision_route)
    multi_samples: int = 8       # rows of kv-eager-xN (1: no multi-sample variant)
    quality_prompts: int = 10    # prompts in kv-fast's quality guard (0: no guard)
    peak_bandwidth: float = 0.0  # bytes/s of the device's memory for bandwidth_util; 0 = peaks.device_peaks'

    def validate(self) -> None:
        if not isinstance(self.threads, int) or self.threads < 0:
            raise ConfigError(f"inference_bench: threads must be 0 (default) or positive, got {self.threads!r}")
        for key in ("depth", "vocab_size", "prompt_len", "new_tokens", "num_samples", "diversity_samples", "repeats"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"inference_bench: {key} must be a positive integer, got {value!r}")
        for key in ("multi_samples", "quality_prompts"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < (1 if key == "multi_samples" else 0):
                raise ConfigError(f"inference_bench: {key} must be a {'positive' if key == 'multi_samples' else 'non-negative'} "
                                  f"integer, got {value!r}")
        if self.precision not in DECODE_PRECISIONS:
            raise ConfigError(f"inference_bench: precision must be one of {', '.join(DECODE_PRECISIONS)}, got {self.precision!r}")
        if isinstance(self.peak_bandwidth, bool) or not isinstance(self.peak_bandwidth, (int, float)) \
                or self.peak_bandwidth < 0:
            raise ConfigError(f"inference_bench: peak_bandwidth must be >= 0 (bytes/s; 0 = the table or the CUDA "
                              f"properties), got {self.peak_bandwidth!r}")
        if self.new_tokens < 2:
            raise ConfigError("inference_bench: new_tokens must be at least 2 (time per output token needs two)")
        if self.dtype not in ("", "float32", "bfloat16"):
            raise ConfigError(f"inference_bench: dtype must be float32, bfloat16 or empty, got {self.dtype!r}")
        if self.device_type not in ("", "cpu", "cuda", "mps"):
            raise ConfigError(f"inference_bench: device_type must be cpu, cuda, mps or empty, got {self.device_type!r}")
        for key, message in self.check_args(vars(self)):
            raise ConfigError(f"inference_bench: {key}: {message}")

    @staticmethod
    def check_args(args: dict) -> list[tuple[str, str]]:
        """Values that cannot run on the stage's device (the spec passes device_type cuda for a stage with GPUs)."""
        if args.get("precision") == "int8" and args.get("device_type") == "cuda":
            return [("precision", INT8_CPU_ONLY)]
        return []


def randomize_weights(model, seed: int = 0) -> None:
    """nanochat's init zeroes every output projection, so a fresh model ignores attention entirely and
    a KV-cache bug could not change its output. For benchmarking untrained models, give every
    matrix a scaled normal init so attention matters and logits are O(1) (greedy ties are unlikely)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            std = 1.0 if "wte" in name else 1.0 / math.sqrt(p.size(1))
            p.copy_(torch.randn(p.shape, generator=g) * std)


def _load(cfg: InferenceBenchConfig, device: torch.device):
    """(model, tokenizer or None, description of the weights)."""
    if cfg.init_from:
        from nanochat.checkpoint import load_model
        model, tokenizer, _meta = load_model(cfg.init_from, device)
        return model, tokenizer, f"checkpoint {cfg.init_from}"
    seq = max(1024, cfg.prompt_len + cfg.new_tokens)
    model = build_model(GPTConfig.from_depth(cfg.depth, cfg.vocab_size, seq), device=device)
    randomize_weights(model, cfg.seed)
    return model, None, "random (no checkpoint: speed only, outputs meaningless)"


def _decode_bytes_per_step(model, num_samples: int, context: float) -> float:
    """Bytes a decode step must read at the least: every weight once (the embedding only for the rows'
    tokens) plus the K and V of the context for each row."""
    c = model.config
    elem = model.transformer.wte.weight.element_size()
    skip = {id(model.transformer.wte.weight), id(model.cos), id(model.sin)}
    # parameters and buffers (an int8 model keeps its weights and scales as buffers), in their own dtypes
    stored = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()] if id(t) not in skip)
    weights = stored + num_samples * c.n_embd * elem
    head_dim = c.n_embd // c.n_head
    kv = 2 * c.n_layer * c.n_kv_head * head_dim * context * num_samples * elem
    return weights + kv


def _timed_engine_run(engine: Engine, prompt: list[int], cfg: InferenceBenchConfig, device, num_samples: int) -> dict:
    outputs = [[] for _ in range(num_samples)]
    synchronize(device)
    t0 = time.perf_counter()
    t_first = None
    for column, _ in engine.generate(prompt, num_samples=num_samples, max_tokens=cfg.new_tokens,
                                     temperature=0.0, use_tools=False, stop_at_end=False):
        if t_first is None:
            t_first = time.perf_counter()   # the tokens are on the host: no sync needed
        for r, token in enumerate(column):
            outputs[r].append(token)
    t_end = time.perf_counter()
    return {"outputs": outputs, "ttft": t_first - t0, "total": t_end - t0}


def _timed_naive_run(model, prompt: list[int], cfg: InferenceBenchConfig, device) -> dict:
    synchronize(device)
    t0 = time.perf_counter()
    generate_naive(model, prompt, 1, num_samples=cfg.num_samples)
    ttft = time.perf_counter() - t0
    t0 = time.perf_counter()
    outputs = generate_naive(model, prompt, cfg.new_tokens, num_samples=cfg.num_samples)
    total = time.perf_counter() - t0
    return {"outputs": outputs, "ttft": ttft, "total": total}


def _warm_up(engine: Engine, prompt: list[int], cfg: InferenceBenchConfig, num_samples: int) -> None:
    # Same shapes as the timed run (a captured graph is keyed by them); stop after a few steps.
    gen = engine.generate(prompt, num_samples=num_samples, max_tokens=cfg.new_tokens,
                          temperature=0.0, use_tools=False, stop_at_end=False)
    for i, _ in enumerate(gen):
        if i >= 3:
            break
    gen.close()


def _first_mismatch(a: list[list[int]], b: list[list[int]]) -> int | None:
    for row_a, row_b in zip(a, b):
        for i, (x, y) in enumerate(zip(row_a, row_b)):
            if x != y:
                return i
    return None


class DecodeMismatch(RuntimeError):
    """A cached decode variant disagreed with the full forward in the fp32 decode check."""


def run(cfg: InferenceBenchConfig, should_stop=None, raise_on_mismatch: bool = True) -> list[dict]:
    """The rows, one per variant. A variant that fails the fp32 decode check gets a FAILED row and
    then (raise_on_mismatch, what a stage wants) DecodeMismatch is raised once the rows are written."""
    cfg.validate()
    threads_before = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        rows = _run(cfg, should_stop)
    finally:
        torch.set_num_threads(threads_before)
    failed = [r for r in rows if r.get("decode_check") == "FAIL"]
    if failed and raise_on_mismatch:
        where = f" (rows: {Path(cfg.out_dir) / 'inference_bench.json'})" if cfg.out_dir else ""
        raise DecodeMismatch("; ".join(f"{r['variant']}: {r['error']}" for r in failed) + where)
    return rows


@torch.inference_mode()
def greedy_agreement(reference, fast, prompts: list[list[int]], new_tokens: int) -> dict:
    """The fast model against the reference (fp32) on greedy decoding. Per prompt the reference decodes
    new_tokens greedily; the fast model then reads prompt + those tokens in one forward and its argmax
    at each generated position is compared (teacher forcing: one early near-tie does not decide every
    later position). Also the mean length of exact free-running agreement (fast decoding on its own)."""
    agree = total = 0
    prefix = []
    ref_engine, fast_engine = Engine(reference, decode="eager"), Engine(fast, decode="eager")
    for prompt in prompts:
        ref = [c[0] for c, _ in ref_engine.generate(prompt, max_tokens=new_tokens, temperature=0.0,
                                                    use_tools=False, stop_at_end=False)]
        ids = torch.tensor([prompt + ref[:-1]], dtype=torch.long, device=fast.get_device())
        guess = fast(ids)[0, len(prompt) - 1:].argmax(dim=-1).tolist()
        agree += sum(a == b for a, b in zip(guess, ref))
        total += len(ref)
        free = [c[0] for c, _ in fast_engine.generate(prompt, max_tokens=new_tokens, temperature=0.0,
                                                      use_tools=False, stop_at_end=False)]
        same = next((i for i, (a, b) in enumerate(zip(free, ref)) if a != b), len(ref))
        prefix.append(same)
    return {"greedy_agreement": agree / total if total else None, "quality_prompts": len(prompts),
            "free_running_prefix_mean": sum(prefix) / len(prefix) if prefix else None}


def _run(cfg: InferenceBenchConfig, should_stop=None) -> list[dict]:
    device = torch.device(cfg.device_type or autodetect_device_type())
    fast_precision = decode_precision_route(cfg.precision, device)   # refused here, before any work
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model, _tokenizer, weights = _load(cfg, device)
    model.eval().float()       # the decode check runs first, in fp32; the timed runs then in cfg.dtype
    total_len = cfg.prompt_len + cfg.new_tokens
    if total_len > model.cos.size(1):
        raise ConfigError(f"inference_bench: prompt_len + new_tokens = {total_len} is past the model's "
                          f"rotary table ({model.cos.size(1)})")
    g = torch.Generator().manual_seed(cfg.seed)
    vocab = model.config.vocab_size
    # ordinary tokens only (the last ids are the tokenizer's special tokens)
    prompt = torch.randint(0, max(1, vocab - 16), (cfg.prompt_len,), generator=g).tolist()

    variants = ["naive", "kv-eager"]
    variants.append("kv-graph" if device.type == "cuda" else "kv-static")
    if device.type != "cuda":
        variants.append("kv-graph")
    decode_of = {"kv-eager": "eager", "kv-static": "static", "kv-graph": "graph"}
    checks: dict[str, dict] = {}
    naive_fp32 = None
    with full_fp32_matmuls():
        for variant in variants:
            if variant in decode_of and not (variant == "kv-graph" and device.type != "cuda"):
                checks[variant] = check_decode(model, prompt, cfg.new_tokens, cfg.num_samples, decode_of[variant])
        if checks:
            naive_fp32 = generate_naive(model, prompt, cfg.new_tokens, num_samples=cfg.num_samples)
    timed_dtype = getattr(torch, cfg.dtype) if cfg.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    timed_precision = {torch.float32: "fp32", torch.bfloat16: "bf16"}[timed_dtype]
    fast_model = None
    if fast_precision != timed_precision:
        import copy
        fast_model = copy.deepcopy(model)      # from the fp32 weights, before the cast below
        prepare_for_inference(fast_model, fast_precision)
    model.to(timed_dtype)      # bf16 on CUDA: decode is bound by reading weights, half the bytes
    variants.append("kv-fast")
    multi = f"kv-eager-x{cfg.multi_samples}" if cfg.multi_samples > 1 and cfg.num_samples == 1 else None
    if multi:
        variants.append(multi)
    quality = None
    if fast_model is not None and cfg.quality_prompts:
        prompts = [torch.randint(0, max(1, vocab - 16), (cfg.prompt_len,), generator=g).tolist()
                   for _ in range(cfg.quality_prompts)]
        with full_fp32_matmuls():
            quality = greedy_agreement(model if timed_dtype == torch.float32 else model.float(), fast_model,
                                       prompts, cfg.new_tokens)
        model.to(timed_dtype)

    name = device_name(device)
    peaks = device_peaks(device, bandwidth_override=cfg.peak_bandwidth)
    bandwidth_peak = peaks["peak_bandwidth"]
    common = {
        "kind": "inference_bench", "device_name": name, "world_size": 1, "depth": model.config.n_layer,
        "n_params": model.num_params(), "seq_len": total_len, "device_batch_size": cfg.num_samples,
        "batch_size_source": "config", "compile": False, "git_commit": git_commit(),
        "prompt_len": cfg.prompt_len, "new_tokens": cfg.new_tokens, "num_samples": cfg.num_samples,
        "weights": weights, "weights_dtype": str(model.transformer.wte.weight.dtype).replace("torch.", ""),
        "repeats": cfg.repeats, "threads": torch.get_num_threads() if device.type == "cpu" else None,
    }

    rows: list[dict] = []
    runners = {}     # variant -> (rows decoded together, () -> timed result)
    for variant in variants:
        row = dict(common, variant=variant)
        rows.append(row)
        if variant == "kv-graph" and device.type != "cuda":
            row.update(state="SKIPPED", skip_reason="CUDA graph capture needs a CUDA device (running on "
                       f"{device.type}); kv-static runs the same decode step uncaptured")
            continue
        if variant == "kv-fast":
            row.update(precision=fast_precision, weights_dtype=fast_precision)
            if fast_model is None:
                row.update(state="SKIPPED", skip_reason=f"the fast precision here ({fast_precision}) is the timed dtype")
                continue
            if quality is not None:
                row.update(quality)
        check = checks.get(variant)
        if check is not None:
            row.update(decode_check="pass" if check["ok"] else "FAIL", decode_check_max_logit_diff=check["max_logit_diff"],
                       decode_check_tolerance=check["tolerance"],
                       greedy_identical_fp32=_first_mismatch(naive_fp32, check["tokens"]) is None)
            if not check["ok"]:
                # not timed: a decode that computes the wrong thing has no speed worth reporting
                row.update(state="FAILED", error=(
                    f"decode check failed (fp32): max |logit - full forward| {check['max_logit_diff']:.3g} > "
                    f"{check['tolerance']:g}, first at step {check['first_bad_step']}"))
                continue
        if variant == "naive":
            generate_naive(model, prompt, 2, num_samples=cfg.num_samples)   # warm-up
            runners[variant] = (cfg.num_samples, lambda: _timed_naive_run(model, prompt, cfg, device))
            continue
        n = cfg.multi_samples if variant == multi else cfg.num_samples
        engine = Engine(fast_model if variant == "kv-fast" else model,
                        decode=decode_of.get(variant, "eager"))
        _warm_up(engine, prompt, cfg, n)
        runners[variant] = (n, lambda engine=engine, n=n: _timed_engine_run(engine, prompt, cfg, device, n))

    # interleaved: every variant once per repeat, the fastest of each counts
    measured: dict[str, dict] = {}
    t_start = time.perf_counter()
    for _ in range(cfg.repeats):
        for variant, (_n, fn) in runners.items():
            if should_stop is not None and should_stop():
                break
            result = fn()
            if variant not in measured or result["total"] < measured[variant]["total"]:
                measured[variant] = result
    wall = time.perf_counter() - t_start
    for row in rows:
        result = measured.get(row["variant"])
        if result is None:
            continue
        n = runners[row["variant"]][0]
        m = fast_model if row["variant"] == "kv-fast" else model
        bytes_per_step = _decode_bytes_per_step(m, n, cfg.prompt_len + cfg.new_tokens / 2)
        tpot = (result["total"] - result["ttft"]) / (cfg.new_tokens - 1)
        achieved = bytes_per_step / tpot
        row.update(
            state="COMPLETED", rows_decoded=n,
            tokens_per_s=n * cfg.new_tokens / result["total"],
            ttft_s=result["ttft"],
            tpot_s=tpot,
            decode_bytes_per_step=bytes_per_step,
            bandwidth_bytes_per_s=achieved,
            peak_bandwidth_bytes_per_s=bandwidth_peak, peak_bandwidth_source=peaks["peak_bandwidth_source"],
            bandwidth_util=(100.0 * achieved / bandwidth_peak) if bandwidth_peak else None,
            peak_memory_bytes=peak_memory_bytes(device),
            wall_time_s=wall,
        )

    # side-by-side figures, all from this run
    naive = measured.get("naive")
    eager = next((r for r in rows if r["variant"] == "kv-eager" and r.get("state") == "COMPLETED"), None)
    for row in rows:
        result = measured.get(row["variant"])
        if result is None:
            continue
        if naive is not None:
            row["speedup_vs_naive"] = naive["total"] / result["total"]
            if result is not naive:   # naive is the reference itself
                mismatch = _first_mismatch(naive["outputs"], result["outputs"])
                row["greedy_identical"] = mismatch is None
                row["greedy_first_mismatch"] = mismatch
        if eager is not None and row["variant"] in ("kv-fast", multi):
            ratio = row["tokens_per_s"] / eager["tokens_per_s"]
            row["speedup_vs_eager" if row["variant"] == "kv-fast" else "speedup_vs_1_sample"] = ratio

    # independent first tokens: N samples at temperature 1 from one prefill
    if not (should_stop is not None and should_stop()):
        engine = Engine(model, decode="eager")
        distinct = {}
        for mode in ("independent", "broadcast"):  # the fix, and the original bug as its baseline
            first = next(engine.generate(prompt, num_samples=cfg.diversity_samples, max_tokens=1, temperature=1.0,
                                         seed=cfg.seed, use_tools=False, stop_at_end=False, first_token=mode))[0]
            distinct[mode] = len(set(first))
        for row in rows:
            row["first_token_distinct"] = distinct["independent"]
            row["first_token_distinct_broadcast"] = distinct["broadcast"]
            row["diversity_samples"] = cfg.diversity_samples
    if cfg.out_dir:
        atomic_write_json(Path(cfg.out_dir) / "inference_bench.json", {"rows": rows, "summary": summary(rows)})
    return rows


def summary(rows: list[dict]) -> dict:
    """One JSON-able object for the command line: the figures per variant and the headline ratios."""
    out = {"variants": {}}
    for key in ("device_name", "depth", "n_params", "prompt_len", "new_tokens", "num_samples", "weights",
                "weights_dtype", "first_token_distinct", "first_token_distinct_broadcast", "diversity_samples", "repeats", "threads"):
        out[key] = rows[0].get(key) if rows else None
    for row in rows:
        out["variants"][row["variant"]] = {k: row.get(k) for k in (
            "state", "skip_reason", "error", "tokens_per_s", "ttft_s", "tpot_s", "bandwidth_bytes_per_s", "bandwidth_util",
            "greedy_identical", "decode_check", "decode_check_max_logit_diff", "greedy_identical_fp32",
            "speedup_vs_naive", "peak_memory_bytes", "precision", "speedup_vs_eager", "speedup_vs_1_sample",
            "greedy_agreement", "free_running_prefix_mean", "quality_prompts", "rows_decoded")
            if row.get(k) is not None or k == "state"}
    # greedy equality with naive holds for the variants in the timed dtype (kv-fast has its own guard)
    done = [r for r in rows if r.get("state") == "COMPLETED" and r["variant"] not in ("naive", "kv-fast")]
    out["greedy_identical"] = all(r.get("greedy_identical") for r in done) if done else None
    checked = [r for r in rows if r.get("decode_check") is not None]
    # True only when every cached variant that ran passed the fp32 check against the full forward
    out["decode_check"] = all(r["decode_check"] == "pass" for r in checked) if checked else None
    kv = next((r for r in rows if r["variant"] == "kv-eager" and r.get("state") == "COMPLETED"), None)
    out["speedup_kv_vs_naive"] = kv.get("speedup_vs_naive") if kv else None
    graph = next((r for r in rows if r["variant"] == "kv-graph" and r.get("state") == "COMPLETED"), None)
    out["speedup_graph_vs_naive"] = graph.get("speedup_vs_naive") if graph else None
    fast = next((r for r in rows if r["variant"] == "kv-fast" and r.get("state") == "COMPLETED"), None)
    out["fast_precision"] = next((r.get("precision") for r in rows if r["variant"] == "kv-fast"), None)
    out["speedup_fast_vs_eager"] = fast.get("speedup_vs_eager") if fast else None
    out["fast_greedy_agreement"] = fast.get("greedy_agreement") if fast else None
    multi = next((r for r in rows if r["variant"].startswith("kv-eager-x") and r.get("state") == "COMPLETED"), None)
    out["speedup_multi_sample"] = multi.get("speedup_vs_1_sample") if multi else None
    out["multi_samples"] = multi.get("rows_decoded") if multi else None
    return out

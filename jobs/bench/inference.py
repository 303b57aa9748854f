"""
`python -m jobs bench inference --depth D --prompt-len 50 --new-tokens 100 [--num-samples N] [--json]`:
generation without a cache (naive recompute), with the KV cache (eager), and with the captured decode
step (CUDA graphs; on a CPU the same step runs uncaptured as kv-static and kv-graph is skipped), all
in one process on the same prompt. Every cached variant is first checked in fp32 against a full forward
(nanochat.engine.check_decode); one that fails is not timed and the command exits 1. Prints a table,
then (with --json) one JSON object as the last line with the speedup of the KV cache over naive
measured in this run.
"""
from __future__ import annotations

import argparse
import json
import sys

from nanochat.recipes.inference_bench import InferenceBenchConfig, run as run_bench, summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument("--init-from", default="", help="checkpoint folder (default: a fresh random model: speed only)")
    parser.add_argument("--depth", type=int, default=8, help="depth of the fresh model")
    parser.add_argument("--vocab-size", type=int, default=65536, help="vocabulary of the fresh model")
    parser.add_argument("--prompt-len", type=int, default=50, help="prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=100, help="tokens generated per sample")
    parser.add_argument("--num-samples", type=int, default=1, help="samples decoded together (rows)")
    parser.add_argument("--diversity-samples", type=int, default=16,
                        help="samples at temperature 1 whose distinct first tokens are counted")
    parser.add_argument("--device", default="", help="cpu, cuda or mps (default: auto)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per variant; the fastest is reported")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--dtype", default="", choices=["", "float32", "bfloat16"],
                        help="weights in the timed runs (default: bfloat16 on CUDA, float32 elsewhere); "
                             "the decode check is always fp32")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "int8"],
                        help="kv-fast's weights (auto: int8 on a CPU with AMX/AVX512-BF16, bf16 on CUDA, else fp32)")
    parser.add_argument("--multi-samples", type=int, default=8,
                        help="rows of the kv-eager-xN variant, against 1 sample (1: leave it out)")
    parser.add_argument("--quality-prompts", type=int, default=10,
                        help="prompts in kv-fast's greedy agreement guard against fp32 (0: none)")
    parser.add_argument("--out-dir", default="", help="also write inference_bench.json (rows and summary) here")


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def run(args: argparse.Namespace) -> int:
    cfg = InferenceBenchConfig(init_from=args.init_from, device_type=args.device, depth=args.depth,
                               vocab_size=args.vocab_size, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                               num_samples=args.num_samples, diversity_samples=args.diversity_samples,
                               seed=args.seed, out_dir=args.out_dir, repeats=args.repeats, threads=args.threads,
                               dtype=args.dtype, precision=args.precision, multi_samples=args.multi_samples,
                               quality_prompts=args.quality_prompts)
    rows = run_bench(cfg, raise_on_mismatch=False)   # the table shows a failed check; the exit code says it
    s = summary(rows)
    print(f"device {s['device_name']}, depth {s['depth']}, {s['n_params']:,} params ({s['weights_dtype']}), "
          f"weights: {s['weights']}")
    print(f"prompt {s['prompt_len']} tokens, {s['new_tokens']} new tokens x {s['num_samples']} sample(s); "
          f"best of {s['repeats']} run(s)" + (f", {s['threads']} CPU thread(s)" if s["threads"] else ""))
    print(f"{'variant':<11} {'tok/s':>9} {'TTFT ms':>9} {'TPOT ms':>9} {'GB/s':>8} {'BW util%':>8} "
          f"{'greedy=':>7} {'fp32 chk':>8} {'vs naive':>8}")
    for r in rows:
        if r.get("state") != "COMPLETED":
            print(f"{r['variant']:<11} {r.get('state')}: {r.get('skip_reason') or r.get('error') or ''}")
            continue
        print(f"{r['variant']:<11} {r['tokens_per_s']:>9.1f} {1e3 * r['ttft_s']:>9.2f} {1e3 * r['tpot_s']:>9.2f} "
              f"{r['bandwidth_bytes_per_s'] / 1e9:>8.2f} {_fmt(r.get('bandwidth_util'), '>8.1f')} "
              f"{'ref' if r['variant'] == 'naive' else str(r.get('greedy_identical')):>7} "
              f"{'ref' if r['variant'] == 'naive' else str(r.get('decode_check')):>8} "
              f"{_fmt(r.get('speedup_vs_naive'), '>7.2f')}x")
    print("greedy= : greedy tokens equal naive's in the timed dtype; fp32 chk: every step's logits within "
          "tolerance of a full forward in fp32 (the correctness check)")
    print(f"first-token diversity: {s['first_token_distinct']} distinct of {s['diversity_samples']} samples "
          f"(temperature 1, one prefill)")
    if s["speedup_kv_vs_naive"] is not None:
        print(f"KV cache vs naive recompute: {s['speedup_kv_vs_naive']:.2f}x tokens/s (same run)")
    if s["speedup_fast_vs_eager"] is not None:
        agreement = s["fast_greedy_agreement"]
        print(f"kv-fast ({s['fast_precision']}) vs kv-eager (fp32): {s['speedup_fast_vs_eager']:.2f}x tokens/s (same run); "
              + (f"greedy agreement with fp32 {100 * agreement:.1f}% of positions (teacher-forced) over "
                 f"{rows[[r['variant'] for r in rows].index('kv-fast')]['quality_prompts']} prompts"
                 if agreement is not None else "no quality guard run"))
    if s["speedup_multi_sample"] is not None:
        print(f"{s['multi_samples']} samples vs 1 (kv-eager): {s['speedup_multi_sample']:.2f}x tokens/s (same run)")
    if args.json:
        print(json.dumps({"command": "bench inference", **s}, sort_keys=True, default=str))
    failed = [r["variant"] for r in rows if r.get("state") not in ("COMPLETED", "SKIPPED")]
    if failed:
        print(f"FAILED: {', '.join(failed)} (decode check in fp32 against a full forward)", file=sys.stderr)
    return 1 if failed or s["decode_check"] is False else 0

"""
`python -m jobs bench train`: base-training throughput of a GPT of a given depth on this machine
(real data: the prepared shards and tokenizer under the base dir). Prints one line per variant
and, with --json, one JSON object as the last line: tokens/s, MFU where the device's bf16 peak is
known, device batch size and its source. --device-batch-size 0 lets nanochat.training.batch_size
choose; --baseline-batch-size N also runs a fixed batch of N and reports auto / fixed.
--compare-precision runs the fp32 step and the `fast` one (bf16 autocast on CUDA and CPUs with AMX,
fp32 elsewhere: nanochat.training.routes.train_precision_route) alternately, --rounds times each, and reports the best
tokens/s of each, their ratio and how far the fast run's final loss is from fp32's (same data, init).
--ranks 1,2 runs the same global batch on 1 and on 2 processes (gloo on CPU, NCCL on CUDA; the CPU's
threads split between the ranks) and reports tokens/s of each; at the largest rank count also the
plain path (overlap: false) and overlapped / plain. On a small CPU this is a smoke figure, not a claim.

--compare-cpu-step trains the fp32 eager step (the baseline) and each of --routes (fp32 or bf16 autocast,
eager or torch.compile'd) side by side in this one process: same init, same batches, the routes' steps
interleaved so a load change on a shared machine hits all of them. It prints each route's steady tokens/s
and ratio to the baseline, the compile seconds (first step minus a steady one), the step count after
which compiling pays back, and how far each route's per-step loss curve is from fp32 eager's.

--compare-muon times Muon's step on the block matrices of a --depth model (random gradients, no data):
stacked (one batched Newton-Schulz per shape, the training default) against each matrix on its own,
--steps steps each, alternated over --rounds; prints the median step of each, their ratio, and the
largest weight difference between the two after the same steps.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from nanochat.recipes.base_train import BaseTrainConfig, run as run_base_train
from nanochat.errors import ConfigError

# --compare-cpu-step: route name -> (precision, compile) as the training loop takes them
CPU_STEP_ROUTES = {"fp32-eager": ("fp32", False), "fp32-compile": ("fp32", True),
                   "bf16-eager": ("bf16", False), "bf16-compile": ("bf16", True)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--depth", type=int, default=4, help="model depth (width = 64 * depth)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per row")
    parser.add_argument("--device-batch-size", type=int, default=8, help="rows per micro-batch (0 = automatic)")
    parser.add_argument("--total-batch-size", type=int, default=0,
                        help="tokens per optimizer step (0: one micro-batch; 16 rows per rank when automatic)")
    parser.add_argument("--baseline-batch-size", type=int, default=0,
                        help="also run this fixed device batch size and report the ratio to it")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per variant; the first is untimed")
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--precision", default="auto", choices=["auto", "fast", "fp32", "bf16"],
                        help="matmul precision (auto: bf16 on cuda, fp32 on cpu; fast: bf16 also on CPUs with AMX)")
    parser.add_argument("--compare-precision", action="store_true",
                        help="run fp32 and fast (--fast-as bf16 forces bf16) alternately; report the ratio and the final-loss gap")
    parser.add_argument("--fast-as", default="fast", choices=["fast", "bf16"],
                        help="the precision compared against fp32 (bf16: force autocast, to measure it on any CPU)")
    parser.add_argument("--compare-cpu-step", action="store_true",
                        help="fp32 eager vs each of --routes in one process: tok/s, ratio, compile s, payback steps, loss-curve gap")
    parser.add_argument("--routes", default="fp32-compile,bf16-compile",
                        help=f"--compare-cpu-step routes, comma-separated: {', '.join(CPU_STEP_ROUTES)}")
    parser.add_argument("--compare-muon", action="store_true",
                        help="Muon's step stacked by shape vs per matrix (--depth): median ms, ratio, weight diff")
    parser.add_argument("--rounds", type=int, default=2, help="alternations of --compare-precision / --ranks; best counts")
    parser.add_argument("--compile", default="auto", help="auto (on for cuda) | on | off")
    parser.add_argument("--device", default="", help="cpu, cuda or mps (default: auto)")
    parser.add_argument("--base-dir", default="", help="shared artifacts (data, tokenizer); default NANOCHAT_BASE_DIR")
    parser.add_argument("--data-source", default="", help="a folder of shards or .txt/.jsonl (default: Python's own text)")
    parser.add_argument("--ranks", default="",
                        help="comma-separated process counts (e.g. 1,2): tokens/s of each at the same global batch")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")


def _variant(args, device_batch_size: int, total: int, precision: str | None = None) -> dict:
    if total == 0 and device_batch_size == 0:
        total = 16 * args.seq_len
    cfg = BaseTrainConfig(base_dir=args.base_dir, out_dir="", device_type=args.device, depth=args.depth,
                          seq_len=args.seq_len, vocab_size=args.vocab_size, device_batch_size=device_batch_size,
                          total_batch_size=total, num_steps=args.steps, eval_tokens=1, log_every=max(1, args.steps),
                          compile=args.compile, data_source=args.data_source, precision=precision or args.precision)
    return run_base_train(cfg)


def run(args: argparse.Namespace) -> int:
    if args.steps < 2:
        raise ConfigError(f"bench train --steps: need at least 2 (the first is warm-up), got {args.steps}")
    if args.compare_cpu_step:
        return _compare_cpu_step(args)
    if args.compare_muon:
        return _compare_muon(args)
    if args.compare_precision:
        return _compare_precision(args)
    if args.ranks:
        return _compare_ranks(args)
    variants = {("auto" if args.device_batch_size == 0 else "config"): args.device_batch_size}
    if args.baseline_batch_size:
        variants["baseline"] = args.baseline_batch_size
    results = {}
    total = args.total_batch_size
    for name, bs in variants.items():
        row = _variant(args, bs, total)
        total = row["total_batch_size"]  # the baseline trains at the same total batch
        results[name] = {k: row.get(k) for k in (
            "tokens_per_s", "mfu", "device_batch_size", "batch_size_source", "grad_accum_steps",
            "total_batch_size", "peak_memory_bytes", "compile", "num_compiles", "final_loss", "n_params",
            "flops_per_token", "device_name", "world_size")}
        mfu = row.get("mfu")
        print(f"{name:<9} depth={args.depth} T={args.seq_len} B={row['device_batch_size']} "
              f"({row['batch_size_source']}) tok/s={row['tokens_per_s']:,.0f}"
              + (f" mfu={mfu:.1f}%" if mfu is not None else ""), flush=True)
    out = {"bench": "train", "depth": args.depth, "seq_len": args.seq_len, "steps": args.steps, "variants": results}
    main = results[next(iter(variants))]
    out["tokens_per_s"], out["mfu"] = main["tokens_per_s"], main["mfu"]
    if "baseline" in results and results["baseline"]["tokens_per_s"]:
        out["ratio_vs_baseline"] = main["tokens_per_s"] / results["baseline"]["tokens_per_s"]
        print(f"tokens/s ratio {next(iter(variants))} / baseline: {out['ratio_vs_baseline']:.2f}x")
    if args.json:
        print(json.dumps(out, sort_keys=True, default=str))
    return 0


def _compare_precision(args: argparse.Namespace) -> int:
    import torch
    from nanochat.device import autodetect_device_type
    from nanochat.training.routes import train_precision_route
    if args.rounds < 1:
        raise ConfigError(f"bench train --rounds: need at least 1, got {args.rounds}")
    device = torch.device(args.device or autodetect_device_type())
    routes = {"fp32": "fp32", "fast": train_precision_route(args.fast_as, device)}
    best: dict[str, dict] = {}
    for _ in range(args.rounds):      # alternate, so a load change on a shared machine hits both
        for name in routes:
            row = _variant(args, args.device_batch_size, args.total_batch_size, precision=routes[name])
            if name not in best or row["tokens_per_s"] > best[name]["tokens_per_s"]:
                best[name] = row
    out = {"bench": "train", "depth": args.depth, "seq_len": args.seq_len, "steps": args.steps,
           "rounds": args.rounds, "variants": {}}
    for name, row in best.items():
        out["variants"][name] = {"precision": routes[name], "tokens_per_s": row["tokens_per_s"],
                                 "final_loss": row.get("final_loss"), "device_batch_size": row["device_batch_size"]}
        print(f"{name:<5} ({routes[name]}) depth={args.depth} T={args.seq_len} B={row['device_batch_size']} "
              f"tok/s={row['tokens_per_s']:,.0f} final_loss={row.get('final_loss'):.4f}", flush=True)
    fp32, fast = best["fp32"], best["fast"]
    out["ratio_fast_vs_fp32"] = fast["tokens_per_s"] / fp32["tokens_per_s"]
    out["final_loss_gap"] = abs(fast["final_loss"] - fp32["final_loss"]) / abs(fp32["final_loss"])
    print(f"fast ({routes['fast']}) / fp32: {out['ratio_fast_vs_fp32']:.2f}x tokens/s; final loss within "
          f"{100 * out['final_loss_gap']:.2f}% of fp32 after {args.steps} steps (best of {args.rounds} alternations)")
    if args.json:
        print(json.dumps(out, sort_keys=True, default=str))
    return 0


RANK_CHILD = """
import json, sys
from nanochat.recipes.base_train import BaseTrainConfig, run
print("ROW " + json.dumps(run(BaseTrainConfig(**json.loads(sys.argv[1]))), default=str), flush=True)
"""


def _train_on_ranks(cfg: dict, ranks: int, threads: int) -> dict:
    """Base training in `ranks` processes on this machine (a gloo/NCCL group); rank 0's result row."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    repo = str(Path(__file__).resolve().parents[2])   # the checkout: the ranks import its jobs/ and nanochat/
    procs = []
    for rank in range(ranks):
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))}
        env["PYTHONPATH"] = os.pathsep.join([repo] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        env["OMP_NUM_THREADS"] = str(threads)
        if ranks > 1:
            env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(ranks), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, "-c", RANK_CHILD, json.dumps(cfg)], env=env, cwd=repo,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=3600)[0])
    finally:
        for p in procs:  # one rank failed or hung: the others would wait in a collective
            if p.poll() is None:
                p.kill()
                p.wait()
    for rank, (p, out) in enumerate(zip(procs, outs)):
        if p.returncode != 0:
            raise RuntimeError(f"bench train --ranks: rank {rank} of {ranks} exited {p.returncode}:\n{out[-3000:]}")
    return json.loads([l for l in outs[0].splitlines() if l.startswith("ROW ")][-1][4:])


def _compare_ranks(args: argparse.Namespace) -> int:
    try:
        counts = sorted({int(r) for r in args.ranks.split(",") if r.strip()})
    except ValueError:
        raise ConfigError(f"bench train --ranks: expected comma-separated integers, got {args.ranks!r}") from None
    if not counts or counts[0] < 1:
        raise ConfigError(f"bench train --ranks: expected positive process counts, got {args.ranks!r}")
    if args.device_batch_size < 1:
        raise ConfigError("bench train --ranks: needs a fixed --device-batch-size (the probe is per rank count)")
    top = counts[-1]
    # the same global batch, data streams and so rows on every rank count: top ranks x one micro-batch
    total = args.total_batch_size or top * args.device_batch_size * args.seq_len
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cfg = dict(base_dir=args.base_dir, out_dir="", device_type=args.device, depth=args.depth, seq_len=args.seq_len,
               vocab_size=args.vocab_size, device_batch_size=args.device_batch_size, total_batch_size=total,
               num_steps=args.steps, eval_tokens=1, log_every=max(1, args.steps), compile=args.compile,
               data_source=args.data_source, precision=args.precision, num_streams=top)
    if args.rounds < 1:
        raise ConfigError(f"bench train --rounds: need at least 1, got {args.rounds}")
    variants = [(n, True) for n in counts] + ([(top, False)] if top > 1 else [])
    out = {"bench": "train", "mode": "ranks", "depth": args.depth, "seq_len": args.seq_len, "steps": args.steps,
           "total_batch_size": total, "cpu_cores": cores, "rounds": args.rounds, "variants": {}}
    best: dict[str, tuple[int, bool, int, dict]] = {}
    for _ in range(args.rounds):  # alternate, so a load change on a shared machine hits every variant
        for n, overlap in variants:
            threads = max(1, cores // n)
            row = _train_on_ranks({**cfg, "overlap": overlap}, n, threads)
            name = f"ranks={n}" + ("" if overlap else " plain")
            if name not in best or row["tokens_per_s"] > best[name][3]["tokens_per_s"]:
                best[name] = (n, overlap, threads, row)
    for name, (n, overlap, threads, row) in best.items():
        out["variants"][name] = {"ranks": n, "overlap": overlap, "threads_per_rank": threads,
                                 "tokens_per_s": row["tokens_per_s"], "grad_accum_steps": row["grad_accum_steps"],
                                 "final_loss": row["final_loss"]}
        print(f"{name:<14} depth={args.depth} T={args.seq_len} B={row['device_batch_size']} "
              f"grad_accum={row['grad_accum_steps']} threads/rank={threads} tok/s={row['tokens_per_s']:,.0f} "
              f"final_loss={row['final_loss']:.4f}", flush=True)
    v = out["variants"]
    base = v[f"ranks={counts[0]}"]["tokens_per_s"]
    for n in counts[1:]:
        out[f"ratio_{n}_vs_{counts[0]}_ranks"] = v[f"ranks={n}"]["tokens_per_s"] / base
        print(f"{n} ranks / {counts[0]}: {out[f'ratio_{n}_vs_{counts[0]}_ranks']:.2f}x tokens/s")
    if top > 1:
        out["ratio_overlap_vs_plain"] = v[f"ranks={top}"]["tokens_per_s"] / v[f"ranks={top} plain"]["tokens_per_s"]
        print(f"overlapped / plain at {top} ranks: {out['ratio_overlap_vs_plain']:.2f}x tokens/s")
    if args.device in ("", "cpu"):
        print(f"(CPU, {cores} cores shared by the ranks, best of {args.rounds} alternations: a smoke figure of the "
              f"multi-process path, not a speed claim)")
    if args.json:
        print(json.dumps(out, sort_keys=True, default=str))
    return 0


def _compare_muon(args: argparse.Namespace) -> int:
    import statistics
    import time
    import torch
    from nanochat.device import autodetect_device_type, synchronize
    from nanochat.gpt import GPTConfig, build_model
    from nanochat.optim import Muon
    if args.rounds < 1:
        raise ConfigError(f"bench train --rounds: need at least 1, got {args.rounds}")
    device = torch.device(args.device or autodetect_device_type())
    config = GPTConfig.from_depth(args.depth, args.vocab_size, args.seq_len)
    runs = {}
    for name, stack in (("stacked", True), ("per-matrix", False)):  # same init, same gradients
        torch.manual_seed(0)
        model = build_model(config, device)
        params = list(model.transformer.h.parameters())
        runs[name] = dict(params=params, muon=Muon(params, stack=stack), times=[])
    grads = [torch.randn_like(p) for p in runs["stacked"]["params"]]
    for _ in range(args.rounds):  # alternate, so a load change on a shared machine hits both
        for r in runs.values():
            for p, g in zip(r["params"], grads):
                p.grad = g
            for _ in range(args.steps):
                synchronize(device)
                t0 = time.perf_counter()
                r["muon"].step()
                synchronize(device)
                r["times"].append(time.perf_counter() - t0)
    shapes = len({tuple(p.shape) for p in runs["stacked"]["params"]})
    out = {"bench": "train", "mode": "muon", "depth": args.depth, "matrices": len(grads), "shapes": shapes,
           "steps": args.steps, "rounds": args.rounds, "device": str(device), "threads": torch.get_num_threads()}
    for name, r in runs.items():
        out[f"{name}_step_ms"] = 1000 * statistics.median(r["times"])
        print(f"{name:<10} depth={args.depth} matrices={len(grads)} shapes={shapes} "
              f"median step {out[f'{name}_step_ms']:.2f} ms", flush=True)
    out["ratio_stacked_vs_per_matrix"] = out["per-matrix_step_ms"] / out["stacked_step_ms"]
    out["max_weight_diff"] = max((a - b).abs().max().item()
                                 for a, b in zip(runs["stacked"]["params"], runs["per-matrix"]["params"]))
    print(f"stacked / per-matrix: {out['ratio_stacked_vs_per_matrix']:.2f}x faster Muon step; weights differ by "
          f"at most {out['max_weight_diff']:.2e} after {args.rounds * args.steps} steps ({device}, "
          f"{torch.get_num_threads()} threads, median of {args.rounds * args.steps})")
    if args.json:
        print(json.dumps(out, sort_keys=True, default=str))
    return 0


def _loss_gap(curve: list[float], base: list[float]) -> dict:
    """How far a per-step loss curve is from the baseline's: the largest relative deviation over the
    last half of the steps (at most the last 100), raw and on both curves smoothed alike (an
    exponential moving average, 0.9, as a training log shows it)."""
    def ema(xs):
        out, m = [], None
        for x in xs:
            m = x if m is None else 0.9 * m + 0.1 * x
            out.append(m)
        return out
    n = max(1, min(100, len(base) // 2))
    raw = max(abs(a - b) / abs(b) for a, b in zip(curve[-n:], base[-n:]))
    smooth = max(abs(a - b) / abs(b) for a, b in zip(ema(curve)[-n:], ema(base)[-n:]))
    return {"last_steps": n, "max_rel_dev": raw, "max_rel_dev_ema": smooth}


def _compare_cpu_step(args: argparse.Namespace) -> int:
    import statistics
    import time
    import torch
    from nanochat.device import autodetect_device_type
    from nanochat.files import get_base_dir
    from nanochat.cpu_features import cpu_has_amx, cpu_has_fast_bf16
    from nanochat.dataloader import pretraining_loader
    from nanochat.dataset import split_shards
    from nanochat.gpt import CompiledGPT, GPTConfig, build_model
    from nanochat.optim import build_optimizers
    from nanochat.prepare import ensure_pretraining_data, ensure_tokenizer
    from nanochat.training.routes import autocast_context
    from nanochat.training.step import forward_backward
    from nanochat.training.train_loop import lr_multiplier, muon_momentum

    names = [r.strip() for r in args.routes.split(",") if r.strip()]
    for r in names:
        if r not in CPU_STEP_ROUTES:
            raise ConfigError(f"bench train --routes: unknown route {r!r} (choose from {', '.join(CPU_STEP_ROUTES)})")
    if args.device_batch_size <= 0:
        raise ConfigError(f"bench train --compare-cpu-step: needs a fixed --device-batch-size, got {args.device_batch_size}")
    names = ["fp32-eager"] + [r for r in names if r != "fp32-eager"]
    device = torch.device(args.device or autodetect_device_type())
    base_dir = args.base_dir or str(get_base_dir())
    data_path = ensure_pretraining_data(base_dir, args.data_source)
    tokenizer = ensure_tokenizer(base_dir, args.vocab_size, data_path)
    train_shards, _ = split_shards(data_path)
    loader = pretraining_loader(train_shards, tokenizer, args.seq_len)
    config = GPTConfig.from_depth(args.depth, tokenizer.get_vocab_size(), args.seq_len)
    B, T = args.device_batch_size, args.seq_len
    model_flops = 0.0

    routes = {}
    for name in names:
        precision, compiled = CPU_STEP_ROUTES[name]
        torch.manual_seed(42)
        model = build_model(config, device)
        model_flops = model.estimate_flops()
        routes[name] = dict(model=model, optimizers=build_optimizers(model),
                            step_model=CompiledGPT(model) if compiled else model,  # as training compiles
                            autocast=autocast_context(precision, device), times=[], cpu=[], losses=[])
    for step in range(args.steps):
        rows, mask = loader.next_step_rows(B)
        order = names[step % len(names):] + names[:step % len(names)]  # nobody always goes first
        for name in order:
            r = routes[name]
            t0, c0 = time.perf_counter(), time.process_time()
            loss = forward_backward(r["step_model"], rows, mask, B, device, r["autocast"])
            lrm = lr_multiplier(step, args.steps, 0.2)
            for opt in r["optimizers"]:
                for group in opt.param_groups:
                    group["lr"] = group["initial_lr"] * lrm
            r["optimizers"][1].param_groups[0]["momentum"] = muon_momentum(step)
            for opt in r["optimizers"]:
                opt.step()
            r["model"].zero_grad(set_to_none=True)
            r["losses"].append(loss.item())
            r["times"].append(time.perf_counter() - t0)
            r["cpu"].append(time.process_time() - c0)
        if step < 3 or (step + 1) % 10 == 0 or step + 1 == args.steps:
            print(f"step {step + 1}/{args.steps}: " + " ".join(
                f"{n}={routes[n]['times'][-1]:.2f}s/{routes[n]['losses'][-1]:.4f}" for n in names), flush=True)

    tokens = B * T
    skip = 2 if args.steps >= 4 else 1   # a compiled step may recompile once more after the first
    out = {"bench": "train", "mode": "compare-cpu-step", "depth": args.depth, "n_embd": config.n_embd,
           "vocab_size": config.vocab_size, "seq_len": T, "device_batch_size": B, "steps": args.steps,
           "threads": torch.get_num_threads(), "cpu_has_fast_bf16": cpu_has_fast_bf16(),
           "cpu_has_amx": cpu_has_amx(), "routes": {}}
    base = routes["fp32-eager"]
    base_step = statistics.median(base["times"][skip:])
    base_cpu = statistics.median(base["cpu"][skip:])
    print(f"depth={args.depth} width={config.n_embd} vocab={config.vocab_size} B={B} T={T} steps={args.steps} "
          f"threads={torch.get_num_threads()} fast_bf16={cpu_has_fast_bf16()} amx={cpu_has_amx()}", flush=True)
    for name in names:
        r = routes[name]
        step_s = statistics.median(r["times"][skip:])
        cpu_s = statistics.median(r["cpu"][skip:])  # CPU seconds: less sensitive than wall time to other load
        compile_s = max(0.0, r["times"][0] - step_s) if CPU_STEP_ROUTES[name][1] else 0.0
        saved = base_step - step_s
        payback = (compile_s / saved if saved > 0 else None) if CPU_STEP_ROUTES[name][1] else 0
        gap = _loss_gap(r["losses"], base["losses"])
        out["routes"][name] = {"tokens_per_s": tokens / step_s, "ratio": base_step / step_s, "step_s": step_s,
                               "cpu_s_per_step": cpu_s, "cpu_ratio": base_cpu / cpu_s,
                               "first_step_s": r["times"][0], "compile_s": compile_s, "payback_steps": payback,
                               "final_loss": r["losses"][-1], **gap}
        pay = "-" if not CPU_STEP_ROUTES[name][1] else ("never" if payback is None else f"{payback:.0f}")
        print(f"{name:<13} tok/s={tokens / step_s:8,.0f} ratio={base_step / step_s:5.2f}x (cpu-s {base_cpu / cpu_s:4.2f}x) compile={compile_s:6.1f}s "
              f"payback_steps={pay:>6} loss_dev(last {gap['last_steps']} steps: max raw {100 * gap['max_rel_dev']:.2f}%, "
              f"max ema {100 * gap['max_rel_dev_ema']:.2f}%) final_loss={r['losses'][-1]:.4f}", flush=True)
    from nanochat.training.routes import CPU_COMPILE_MIN_TRAIN_FLOPS, resolve_compile, train_precision_route
    compiled = resolve_compile("auto", device, train_flops=float("inf"))
    out["training_routes"] = {"compile_auto_long_run": compiled,
                              "precision_fast": train_precision_route("fast", device, compiled=compiled)}
    print(f"training here: compile auto -> {'on' if compiled else 'off'} for runs of >= {CPU_COMPILE_MIN_TRAIN_FLOPS:.0e} "
          f"training FLOPs (this shape: {CPU_COMPILE_MIN_TRAIN_FLOPS / (tokens * model_flops):.0f} steps); "
          f"precision fast -> {out['training_routes']['precision_fast']} when compiled; auto/fp32 -> fp32", flush=True)
    if args.json:
        out["loss_curves"] = {name: routes[name]["losses"] for name in names}
        print(json.dumps(out, sort_keys=True, default=str))
    return 0

"""
`python -m jobs gpu-check [--out FILE] [--budget-s S]` (also `make gpu-check`): every GPU path of the
product, short, on this machine's CUDA device, in one command meant for a lent GPU. Progress goes to
stderr; after every check a JSON line with the results so far goes to stdout (and to --out, rewritten),
so a run cut short still says what it found; the last line is the final object. Checks, cheapest first:

- nvml:           gpu_util_mean's sampler on a busy GPU (nvidia-ml-py)
- nccl:           a 2-process NCCL all-reduce through compute_init (only with 2 or more GPUs)
- inference:      bf16 timed decode, eager KV cache / static cache / CUDA graph, each first checked in fp32
                  against a full forward (nanochat.engine.check_decode); kv-graph must complete
- oom_fallback:   base training configured with a batch several times the device memory: a real CUDA
                  out-of-memory, then the run-time fallback halves the micro-batch and keeps the total
- train_compiled: base training compiled (torch.compile), its device batch size found by the probe
                  (compiled trials on the training's own module), three optimizer steps, a checkpoint
- sft_compile:    SFT compile-pad and compile-pack from that checkpoint, with each mode's compile count
                  (one compilation expected: fixed shapes)
- gpu_tests:      the `gpu`-marked tests (pytest -m gpu, in a child process; its output is printed when it
                  runs out of time)

The budget (--budget-s, default 300 s) is a hard wall: checks not started by then are NOT_RUN, and a check
still running then is FAIL (the final JSON is written and the command exits 1). Sized so that one run and
a rerun fit in 15 minutes of a lent machine, its start included (the plan is in the README).
Without CUDA it prints one line (a JSON object saying why) and exits 0. Exit 1 when a check fails.
Nothing here needs submitit or rustbpe (the lent GPU machine has neither): training uses a byte-level
tokenizer (256 bytes + the special tokens, no BPE merges) written into a temporary work directory.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

from nanochat.errors import one_line

REPO = Path(__file__).resolve().parents[2]
DEFAULT_BUDGET_S = 300          # a hard wall: a run and a rerun fit in 15 device minutes with the machine's start
DATA_SHARDS, DATA_CHARS = 2, 1_000_000   # enough for every check's few steps, and quick to write


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="", help="also write the JSON result to this file")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                        help="hard wall in seconds: checks not started are NOT_RUN, one still running is FAIL "
                             "(default: %(default)s)")
    parser.add_argument("--only", default="", help="comma-separated checks to run (default: all)")
    parser.add_argument("--keep-workdir", action="store_true", help="keep the temporary work directory")


def _log(msg: str) -> None:
    print(f"[gpu-check] {msg}", file=sys.stderr, flush=True)


def byte_tokenizer_vocab() -> int:
    from nanochat.tokenizer import Tokenizer
    return Tokenizer.byte_level().get_vocab_size()


def prepare_byte_tokenizer(base_dir: Path, num_shards: int = DATA_SHARDS, max_chars: int = DATA_CHARS) -> int:
    """Write the pretraining data (Python's own text) and a byte-level tokenizer where base training
    looks for its tokenizer, so no BPE training (rustbpe) is needed. Returns its vocabulary size."""
    from nanochat.prepare import ensure_pretraining_data, tokenizer_dir
    from nanochat.tokenizer import Tokenizer
    data_path = ensure_pretraining_data(base_dir, "", num_shards, max_chars)
    tok = Tokenizer.byte_level()
    tok.save(tokenizer_dir(base_dir, tok.get_vocab_size(), data_path))
    return tok.get_vocab_size()


# -----------------------------------------------------------------------------
# The checks: each takes the context and returns its figures (raising on failure)

class Skip(Exception):
    """The check cannot run on this machine (e.g. the all-reduce with one GPU)."""


def gpu_test_files() -> list[str]:
    return sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py") if "mark.gpu" in p.read_text())


def check_gpu_tests(ctx: dict) -> dict:
    files = ctx.get("gpu_test_files") or gpu_test_files()
    if not files:
        raise AssertionError("no test file carries a gpu mark")
    junit = Path(ctx["workdir"]) / "gpu-tests.xml"
    timeout = max(5.0, ctx["deadline"] - time.time() - 5)   # leave the wall's last seconds to the report
    cmd = [sys.executable, "-m", "pytest", "-v", "-m", "gpu", "-p", "no:cacheprovider",
           "--continue-on-collection-errors", f"--junitxml={junit}", *files]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    ctx["child"] = proc      # the watchdog kills it with the run
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        sys.stderr.write(output[-6000:])      # what it was doing when the time ran out
        running = [line for line in output.splitlines() if "::" in line][-1:]
        raise AssertionError(f"pytest -m gpu did not finish in {timeout:.0f} s"
                             + (f" (last: {running[0].strip()[:200]})" if running else "")) from None
    finally:
        ctx.pop("child", None)
    sys.stderr.write(output[-4000:])
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed = []
    if junit.exists():
        root = ET.parse(junit).getroot()
        for suite in ([root] if root.tag == "testsuite" else root.findall("testsuite")):
            for k in counts:
                counts[k] += int(suite.get(k, 0))
            for case in suite.iter("testcase"):
                if case.find("failure") is not None or case.find("error") is not None:
                    failed.append(f"{case.get('classname')}::{case.get('name')}")
    out = {"files": files, "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
           **{k: counts[k] for k in ("failures", "errors", "skipped")}, "failed": failed[:10], "pytest_rc": proc.returncode}
    if proc.returncode not in (0, 5) or counts["failures"] or counts["errors"]:
        raise AssertionError(f"pytest -m gpu: {json.dumps(out)}")
    if out["passed"] < 1:
        raise AssertionError(f"pytest -m gpu ran no test: {json.dumps(out)}")
    return out


# The checks' configs, built apart so a CPU test can build and validate every one of them.

def inference_config(device_type: str = "cuda"):
    from nanochat.recipes.inference_bench import InferenceBenchConfig
    return InferenceBenchConfig(device_type=device_type, depth=8, vocab_size=65536, prompt_len=50, new_tokens=64,
                                num_samples=4, diversity_samples=16)


def train_compiled_config(workdir, vocab: int, device_type: str = "cuda"):
    from nanochat.recipes.base_train import BaseTrainConfig
    return BaseTrainConfig(base_dir=str(workdir), out_dir=str(Path(workdir) / "base"), device_type=device_type, depth=4,
                           seq_len=256, vocab_size=vocab, device_batch_size=0, total_batch_size=4 * 256, num_steps=3,
                           eval_tokens=1, log_every=1, compile="on", num_shards=DATA_SHARDS, data_max_chars=DATA_CHARS)


def sft_config(workdir, init_from: str, device_type: str = "cuda"):
    from nanochat.recipes.sft import SFTConfig
    return SFTConfig(base_dir=str(workdir), init_from=init_from, device_type=device_type, seq_len=256,
                     device_batch_size=4, max_steps=4, num_conversations=200, val_conversations=8, save_checkpoint=False)


OOM_DEPTH, OOM_SEQ_LEN = 20, 2048


def oom_config(workdir, vocab: int, total_memory: int, device_type: str = "cuda"):
    from nanochat.recipes.base_train import BaseTrainConfig
    rows = oom_batch_rows(total_memory, OOM_DEPTH, OOM_SEQ_LEN)
    return BaseTrainConfig(base_dir=str(workdir), out_dir="", device_type=device_type, depth=OOM_DEPTH,
                           seq_len=OOM_SEQ_LEN, vocab_size=vocab, device_batch_size=rows,
                           total_batch_size=rows * OOM_SEQ_LEN, num_steps=1, eval_tokens=1, log_every=1,
                           compile="off", num_shards=DATA_SHARDS, data_max_chars=DATA_CHARS)


def oom_batch_rows(total_memory: int, depth: int, seq_len: int) -> int:
    """Rows per micro-batch whose activations are about three times the device memory: bf16 activations
    take about 34 bytes per token per layer per unit of width (Korthikanti et al. 2022)."""
    width = 64 * depth
    tokens = 3 * total_memory / (34 * depth * width)
    return max(1, 2 ** math.ceil(math.log2(max(tokens / seq_len, 1))))


def check_inference(ctx: dict) -> dict:
    from nanochat.recipes.inference_bench import run, summary
    rows = run(inference_config())     # raises DecodeMismatch when a cached variant fails the fp32 check
    s = summary(rows)
    by = {r["variant"]: r for r in rows}
    graph = by.get("kv-graph", {})
    if graph.get("state") != "COMPLETED" or graph.get("decode_check") != "pass":
        raise AssertionError(f"kv-graph: {graph.get('state')} {graph.get('error') or graph.get('skip_reason') or ''}")
    if s["decode_check"] is not True:
        raise AssertionError(f"decode check: {s['decode_check']}")
    return {"weights_dtype": s["weights_dtype"], "decode_check": s["decode_check"],
            "speedup_kv_vs_naive": s["speedup_kv_vs_naive"], "speedup_graph_vs_naive": s["speedup_graph_vs_naive"],
            "first_token_distinct": s["first_token_distinct"],
            "variants": {v: {k: r.get(k) for k in ("tokens_per_s", "decode_check_max_logit_diff", "greedy_identical",
                                                   "greedy_identical_fp32", "bandwidth_util")}
                         for v, r in by.items() if r.get("state") == "COMPLETED"}}


def check_train_compiled(ctx: dict) -> dict:
    from nanochat.recipes.base_train import run
    cfg = train_compiled_config(ctx["workdir"], ctx["vocab"])
    row = run(cfg)
    info = row.get("batch_info") or {}
    figures = {k: row.get(k) for k in ("device_batch_size", "batch_size_source", "grad_accum_steps",
                                       "num_compiles", "tokens_per_s", "mfu", "final_loss", "peak_memory_bytes")}
    figures["run_state"] = row.get("state")
    figures.update(probe_trials=len(info.get("trials") or []), probe_seconds=info.get("seconds"))
    if row.get("state") != "COMPLETED" or not row.get("compile") or row.get("batch_size_source") != "probe":
        raise AssertionError(f"compiled training: {figures}")
    if not math.isfinite(row.get("final_loss") or float("nan")) or not row.get("num_compiles"):
        raise AssertionError(f"compiled training: no compile or a non-finite loss: {figures}")
    ctx["base_checkpoints"] = str(Path(cfg.out_dir) / "checkpoints")
    return figures


def check_sft_compile(ctx: dict) -> dict:
    if not ctx.get("base_checkpoints"):
        raise Skip("needs train_compiled's checkpoint")
    from nanochat.recipes.sft import bench
    rows = bench(sft_config(ctx["workdir"], ctx["base_checkpoints"]), ("compile-pad", "compile-pack"))
    figures = {r["variant"]: {"state": r["state"], "num_compiles": r["num_compiles"],
                              "compile_seconds": r["extra"]["compile_seconds"],
                              "real_tokens_per_s": r["real_tokens_per_s"], "padding_fraction": r["padding_fraction"],
                              "final_loss": r["final_loss"]} for r in rows}
    bad = {m: f for m, f in figures.items() if f["state"] != "COMPLETED" or f["num_compiles"] != 1
           or not math.isfinite(f["final_loss"] or float("nan"))}
    if bad:
        raise AssertionError(f"SFT (one compilation per mode expected): {json.dumps(bad)}")
    return figures


def oom_fallback_figures(row: dict, cfg) -> dict:
    """The oom_fallback check's verdict on a training row of oom_config(cfg): a configured batch that ran
    out of memory falls back (batch_size_source config+oom_fallback: a configured size stays the fixed
    side of the report), keeps the total batch exact and trains on. Raises AssertionError otherwise."""
    from nanochat.training.retry import source_after_oom
    rows, T = cfg.device_batch_size, cfg.seq_len
    figures = {"configured_device_batch_size": rows, "seq_len": T, "depth": cfg.depth, "run_state": row.get("state"),
               **{k: row.get(k) for k in ("device_batch_size", "grad_accum_steps", "batch_size_source",
                                          "total_batch_size", "final_loss", "peak_memory_bytes")}}
    if row.get("batch_size_source") != source_after_oom("config"):
        raise AssertionError(f"no out-of-memory fallback at {rows} rows x {T} tokens (depth {cfg.depth}): {figures}")
    if row["device_batch_size"] * row["grad_accum_steps"] != rows or row["total_batch_size"] != rows * T:
        raise AssertionError(f"the fallback changed the total batch: {figures}")
    if row.get("state") != "COMPLETED" or not math.isfinite(row.get("final_loss") or float("nan")):
        raise AssertionError(f"training after the fallback: {figures}")
    return figures


def check_oom_fallback(ctx: dict) -> dict:
    import torch
    from nanochat.recipes.base_train import run
    cfg = oom_config(ctx["workdir"], ctx["vocab"], torch.cuda.get_device_properties(0).total_memory)
    return oom_fallback_figures(run(cfg), cfg)


def check_nvml(ctx: dict) -> dict:
    import torch
    from nanochat.gpu_monitor import start_gpu_sampler
    index = torch.cuda.current_device()
    sampler, why = start_gpu_sampler("cuda", index, interval_s=0.1)
    if sampler is None:
        raise AssertionError(f"no NVML sampler: {why}")
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t_end = time.time() + 3.0
    while time.time() < t_end:
        for _ in range(20):
            a = (a @ a).clamp_(-1, 1)
        torch.cuda.synchronize()
    mean = sampler.stop()
    figures = {"gpu_util_mean_busy": mean, "samples": len(sampler.samples)}
    if mean is None or not 0 < mean <= 100:
        raise AssertionError(f"NVML utilisation during 3 s of matmuls: {figures}")
    return figures


def _nccl_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import torch
    import torch.distributed as dist
    from nanochat.distributed import compute_cleanup, compute_init
    info = compute_init("cuda")
    t = torch.tensor([float(rank + 1)], device=info.device)
    dist.all_reduce(t)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(
        {"device": str(info.device), "backend": dist.get_backend(), "sum": float(t.item())}))
    compute_cleanup()


def check_nccl(ctx: dict) -> dict:
    import torch
    import torch.multiprocessing as mp
    n = torch.cuda.device_count()
    if n < 2:
        raise Skip(f"{n} GPU visible: the NCCL all-reduce needs 2")
    out_dir = Path(ctx["workdir"]) / "nccl"
    out_dir.mkdir(exist_ok=True)
    port = 29500 + os.getpid() % 1000
    mp.spawn(_nccl_worker, args=(2, port, str(out_dir)), nprocs=2, join=True)
    ranks = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(2)]
    if [r["sum"] for r in ranks] != [3.0, 3.0] or {r["backend"] for r in ranks} != {"nccl"}:
        raise AssertionError(f"all-reduce: {ranks}")
    if [r["device"] for r in ranks] != ["cuda:0", "cuda:1"]:
        raise AssertionError(f"ranks' devices: {ranks}")
    return {"ranks": ranks}


# Cheapest first: a run cut short has the most checks done. The compiling ones last, pytest's (which
# compiles again in its own process) at the end.
CHECKS = {
    "nvml": check_nvml,
    "nccl": check_nccl,
    "inference": check_inference,
    "oom_fallback": check_oom_fallback,
    "train_compiled": check_train_compiled,
    "sft_compile": check_sft_compile,
    "gpu_tests": check_gpu_tests,
}


def run_checks(names: list[str], ctx: dict, report=lambda results, running: None, clock=time.time) -> dict:
    """Each check in turn; report(results so far, the check running or None) before and after each.
    A check that raises is a FAIL and the next one still runs; past ctx["deadline"] nothing starts."""
    results: dict = {}
    for name in names:
        if clock() > ctx["deadline"]:
            results[name] = {"state": "NOT_RUN", "reason": "time budget spent"}
            _log(f"{name}: NOT_RUN (time budget spent)")
            continue
        _log(f"{name}: running")
        report(results, name)
        t0 = time.perf_counter()
        try:
            result = {**CHECKS[name](ctx), "state": "PASS"}
        except Skip as e:
            result = {"state": "SKIPPED", "reason": str(e)}
        except Exception as e:  # a failed check is a result; the next check still runs
            traceback.print_exc(file=sys.stderr)
            result = {"state": "FAIL", "error": one_line(e)}
        finally:
            _empty_cuda_cache()
        result["seconds"] = round(time.perf_counter() - t0, 1)
        results[name] = result
        _log(f"{name}: {result['state']} ({result['seconds']} s)"
             + (f": {result.get('error') or result.get('reason')}" if result["state"] != "PASS" else ""))
        report(results, None)
    return results


def _empty_cuda_cache() -> None:
    import torch
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Report:
    """The JSON object of a run: written after every check (stdout and --out), final or not. The
    watchdog ends a run at the wall: the check running then is FAIL, the rest NOT_RUN."""

    def __init__(self, names: list[str], header: dict, out_path: str = "", t0: float | None = None):
        self.names, self.header, self.out_path = names, header, out_path
        self.t0 = time.time() if t0 is None else t0
        self.results: dict = {}
        self.running: str | None = None
        self.lock = threading.Lock()
        self.done = False

    def obj(self, final: bool) -> dict:
        checks = dict(self.results)
        if final:
            for name in self.names:
                checks.setdefault(name, {"state": "NOT_RUN", "reason": "time budget spent"})
        failed = [n for n, r in checks.items() if r["state"] in ("FAIL", "NOT_RUN")]
        state = ("FAIL" if failed else "PASS") if final else "RUNNING"
        return {"command": "gpu-check", "state": state, "failed": failed, **self.header,
                "running": None if final else self.running, "pending": [n for n in self.names if n not in checks],
                "seconds": round(time.time() - self.t0, 1), "checks": checks}

    def write(self, final: bool = False) -> dict:
        obj = self.obj(final)
        line = json.dumps(obj, sort_keys=True, default=str)
        if self.out_path:
            from nanochat.files import atomic_write_text
            atomic_write_text(self.out_path, line + "\n")
        print(line, flush=True)
        return obj

    def update(self, results: dict, running: str | None) -> None:
        with self.lock:
            if not self.done:
                self.results, self.running = dict(results), running
                self.write()

    def finish(self) -> dict:
        with self.lock:
            self.done = True
            return self.write(final=True)

    def at_the_wall(self, ctx: dict, exit=os._exit) -> None:
        """The watchdog's end of a run: the running check FAILs, the final object is written, exit 1."""
        with self.lock:
            if self.done:
                return
            if self.running:
                self.results[self.running] = {"state": "FAIL", "error": "still running at the time budget's end",
                                              "seconds": round(time.time() - self.t0, 1)}
            child = ctx.get("child")
            if child is not None:
                try:
                    os.killpg(child.pid, signal.SIGKILL)
                except OSError:
                    pass
            self.done = True
            self.write(final=True)
        _log("time budget spent: stopping")
        exit(1)


def _skip_line(reason: str) -> int:
    print(json.dumps({"command": "gpu-check", "state": "SKIPPED", "reason": reason}), flush=True)
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        import torch
    except ImportError:
        return _skip_line(f"torch is not importable by {sys.executable}: nothing to check")
    if not torch.cuda.is_available():
        return _skip_line(f"no CUDA device here (torch {torch.__version__}, built for CUDA "
                          f"{torch.version.cuda or 'none'}): nothing to check")
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(CHECKS)
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        from nanochat.errors import ConfigError
        raise ConfigError(f"gpu-check --only: unknown check {unknown[0]!r} (choose from {', '.join(CHECKS)})")
    from nanochat.files import git_commit
    from nanochat.peaks import DEVICE_PEAKS, device_peaks
    t0 = time.time()
    name = torch.cuda.get_device_name(0)
    header = {"device": name, "device_known": name in DEVICE_PEAKS, "gpus": torch.cuda.device_count(),
              **device_peaks(torch.device("cuda", 0)), "total_memory": torch.cuda.get_device_properties(0).total_memory,
              "torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0],
              "git_commit": git_commit(REPO), "budget_s": args.budget_s}
    report = Report(names, header, args.out, t0)
    workdir = Path(tempfile.mkdtemp(prefix="nanochat-gpu-check-"))
    ctx = {"workdir": workdir, "deadline": t0 + args.budget_s}
    watchdog = threading.Timer(max(0.0, ctx["deadline"] - time.time()), report.at_the_wall, args=(ctx,))
    watchdog.daemon = True
    watchdog.start()
    try:
        ctx["vocab"] = prepare_byte_tokenizer(workdir)
        run_checks(names, ctx, report.update)
    finally:
        watchdog.cancel()
        if not args.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    return 1 if report.finish()["failed"] else 0

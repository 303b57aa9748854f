"""
Running untrusted code (a model's HumanEval completion) without trusting it.

The program never runs in the caller's process. It runs in a child Python with:
- a wall-clock time limit (the whole process group is killed) and a CPU-time limit (RLIMIT_CPU);
- an address-space limit (RLIMIT_AS), a file-size limit, a cap on processes (RLIMIT_NPROC: a fork
  bomb hits it) and no core dumps;
- a fresh temporary working directory (removed afterwards) and a clean environment (`python -I -B`:
  no PYTHON* variables, no user site, no bytecode written; only PATH/LANG/HOME=tmp are set);
- no network.

Isolation depends on what the machine allows, and `isolation()` says which one is used:
- "namespace" (running as root with util-linux `unshare` and `setpriv`, as on the cluster's test
  nodes here): the child gets its own network namespace (only a down loopback: no route anywhere)
  and its own PID namespace (when its first process dies the kernel kills every process in it, so a
  fork bomb cannot outlive the time limit), and it runs as user nobody: it cannot delete or write
  files outside the folders nobody may write, and RLIMIT_NPROC is enforced (root ignores it).
- "guard" (an ordinary user, no namespaces): the same rlimits and process-group kill, plus the
  in-process guard below.
In both cases the child installs a Python audit hook before the untrusted code is compiled
(audit hooks cannot be removed from Python): socket creation, ctypes (which could call libc's
socket() directly), starting other programs, and writing, deleting or renaming files outside the
temporary folder raise PermissionError. In "guard" mode that hook is the only network barrier,
which is why the namespace is preferred where it is available.
"""
from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

NOBODY = 65534

# Runs in the child before the program: `python -I -B -c GUARD LIMITS [--no-fork|--no-hook] program.py`.
GUARD = r'''
import os, sys, resource
# Limits first, from argv[1]: "cpu_s,address_space_bytes,file_bytes,processes" (set here rather than in
# a preexec_fn, which is unsafe in a caller with threads, as torch's evaluator is).
cpu, mem, fsize, nproc = (int(x) for x in sys.argv.pop(1).split(","))
for which, value in ((resource.RLIMIT_CPU, cpu), (resource.RLIMIT_AS, mem), (resource.RLIMIT_FSIZE, fsize),
                     (resource.RLIMIT_NPROC, nproc), (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(which, (value, value))
ROOT = os.path.realpath(os.getcwd())
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
PATH_EVENTS = {"os.remove", "os.rmdir", "os.rename", "os.replace", "shutil.rmtree", "os.truncate",
               "os.chmod", "os.chown", "os.link", "os.symlink", "os.mkdir", "os.utime", "shutil.move",
               "shutil.copyfile", "os.chdir", "os.chroot"}
DENY_PREFIXES = ("socket.", "ctypes.", "subprocess.", "os.exec", "os.posix_spawn", "os.spawn", "os.system",
                 "os.startfile", "pty.", "_posixsubprocess", "winreg.", "os.kill", "os.killpg", "signal.pthread_kill")
def _inside(path):
    if isinstance(path, int):
        return True   # an already open descriptor
    try:
        p = os.path.realpath(os.fsdecode(path))
    except Exception:
        return False
    return p == ROOT or p.startswith(ROOT + os.sep)
if "--no-fork" in sys.argv[1:2]:
    # guard mode: no PID namespace and (as root) no RLIMIT_NPROC, so processes are not allowed at all
    DENY_PREFIXES += ("os.fork", "os.forkpty")
    del sys.argv[1]
def _hook(event, args):
    if event.startswith(DENY_PREFIXES):
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "open":
        path, mode, flags = args
        writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (isinstance(flags, int) and flags & WRITE_FLAGS)
        if writes and path is not None and not _inside(path):
            raise PermissionError(f"sandbox: writing {path!r} outside the working folder")
    elif event in PATH_EVENTS:
        for a in args:
            if isinstance(a, (str, bytes, os.PathLike)) and not _inside(a):
                raise PermissionError(f"sandbox: {event} {a!r} outside the working folder")
if "--no-hook" in sys.argv[1:2]:
    del sys.argv[1]   # tests only: show what the operating system's limits contain on their own
else:
    sys.addaudithook(_hook)
sys.argv = sys.argv[1:]
with open(sys.argv[0]) as f:
    source = f.read()
code = compile(source, sys.argv[0], "exec")
del f, source
exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
'''


@dataclass
class SandboxResult:
    passed: bool            # exited 0 within the limits
    outcome: str            # passed | failed | timeout | memory | blocked | killed
    returncode: int | None
    seconds: float
    stdout: str = ""
    stderr: str = ""


def _world_executable(path: str) -> bool:
    """Whether user nobody can run this file (every parent folder searchable, the file executable)."""
    p = Path(path).resolve()
    try:
        if not p.stat().st_mode & stat.S_IXOTH:
            return False
        return all(parent.stat().st_mode & stat.S_IXOTH for parent in p.parents)
    except OSError:
        return False


def _python_for(unprivileged: bool) -> str:
    """An interpreter the child can run: ours, or the system's python3 when ours sits under a folder
    nobody cannot enter (e.g. /root/.pyenv). The program needs only the standard library."""
    candidates = [sys.executable, os.path.realpath(sys.executable), shutil.which("python3", path="/usr/bin:/bin:/usr/local/bin")]
    for c in candidates:
        if c and (not unprivileged or _world_executable(c)):
            return c
    raise RuntimeError("sandbox: no Python interpreter that user nobody can run (install python3 in /usr/bin)")


def isolation() -> str:
    """"namespace" when root with unshare and setpriv (network + PID namespaces, user nobody), else "guard"."""
    if os.geteuid() == 0 and shutil.which("unshare") and shutil.which("setpriv"):
        return "namespace"
    return "guard"


def run_python(program: str, timeout_s: float = 10.0, memory_bytes: int = 1 << 30, max_processes: int = 32,
               max_file_bytes: int = 16 << 20, mode: str | None = None, audit_hook: bool = True) -> SandboxResult:
    """Run `program` (Python source) in a sandboxed child and report how it ended. Never raises for
    anything the program does; `mode` forces "namespace" or "guard" (default: isolation()).
    audit_hook=False (namespace mode, for tests) leaves only the operating system's barriers."""
    mode = mode or isolation()
    if mode not in ("namespace", "guard"):
        raise ValueError(f"sandbox mode must be namespace or guard, got {mode!r}")
    workdir = tempfile.mkdtemp(prefix="nanochat-sandbox-")
    out_path = err_path = None
    t0 = time.perf_counter()
    try:
        Path(workdir, "program.py").write_text(program)
        python = _python_for(mode == "namespace")
        if not audit_hook and mode != "namespace":
            raise ValueError("the audit hook can only be left out in namespace mode")
        flags = ["--no-fork"] if mode == "guard" else [] if audit_hook else ["--no-hook"]
        limits = f"{max(1, int(timeout_s + 1))},{memory_bytes},{max_file_bytes},{max_processes}"
        argv = [python, "-I", "-B", "-c", GUARD, limits, *flags, "program.py"]
        if mode == "namespace":
            os.chown(workdir, NOBODY, NOBODY)
            os.chown(Path(workdir, "program.py"), NOBODY, NOBODY)
            # --fork: the program is the first process of the new PID namespace (all die with it);
            # --kill-child: it dies when unshare is killed at the time limit.
            argv = ["unshare", "--net", "--pid", "--fork", "--kill-child",
                    "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--"] + argv
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir}
        # Output goes to files outside the work folder, not pipes: a leftover child holding a pipe
        # open could block the reader; a file is read when the process group is gone.
        fd_out, out_path = tempfile.mkstemp(prefix="nanochat-sandbox-out-")
        fd_err, err_path = tempfile.mkstemp(prefix="nanochat-sandbox-err-")
        with os.fdopen(fd_out, "wb") as out, os.fdopen(fd_err, "wb") as err:
            proc = subprocess.Popen(argv, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    start_new_session=True, close_fds=True)
            timed_out = False
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            _kill_group(proc.pid)      # also after a normal exit: nothing it started may stay behind
            proc.wait()
        seconds = time.perf_counter() - t0
        stdout = _tail(out_path)
        stderr = _tail(err_path)
        rc = proc.returncode
        if timed_out or rc in (-signal.SIGXCPU, 128 + signal.SIGXCPU):
            outcome = "timeout"
        elif rc == 0:
            outcome = "passed"
        elif "MemoryError" in stderr or "Cannot allocate memory" in stderr:
            outcome = "memory"
        elif "sandbox: " in stderr or "Operation not permitted" in stderr or "Permission denied" in stderr:
            outcome = "blocked"
        elif rc is not None and rc < 0:
            outcome = "killed"
        else:
            outcome = "failed"
        return SandboxResult(passed=outcome == "passed", outcome=outcome, returncode=rc, seconds=seconds,
                             stdout=stdout, stderr=stderr)
    finally:
        for p in (out_path, err_path):
            if p:
                Path(p).unlink(missing_ok=True)
        shutil.rmtree(workdir, ignore_errors=True)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(path: str, limit: int = 4000) -> str:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - limit))
        return f.read().decode("utf-8", errors="replace")

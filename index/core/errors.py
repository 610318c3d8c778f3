"""The one base exception for a user's mistake: a bad config, an unknown name, a missing or foreign path.

Every command-line entry point runs through `run_main`, which catches `UserError` and prints
`prog: error: <message>` with exit status 2 (argparse's convention); Ctrl-C prints one line and exits
130 (the shell's 128 + SIGINT), since every command resumes where it stopped; anything else is a bug
and keeps its traceback. Subclasses also derive from the built-in exception a caller would expect
(`ValueError`, `FileNotFoundError`, ...), so `except ValueError` keeps working where it did.
"""
from __future__ import annotations

import errno
import sys
from typing import Callable, Sequence

from index.core.allocator import tune_allocator


class UserError(Exception):
    """Raised for input the user can fix; the message says what is wrong and, where there are
    choices, what the valid ones are."""


class ConfigError(UserError, ValueError):
    """A config field or command-line option has a value it cannot take."""


class InputError(UserError, ValueError):
    """An input file or directory is missing, unreadable, truncated or not what it claims to be."""


class MissingInputError(UserError, FileNotFoundError):
    """An input file or directory does not exist."""


class MissingDependencyError(UserError, ImportError):
    """An optional package a requested feature needs is not installed; the message names it."""


def run_main(prog: str, main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> int:
    """Run a command's `main(argv)`; a `UserError` prints ``prog: error: ...`` and returns 2.

    argparse already reports its own errors this way (and exits 2). A full disk (or file size limit)
    prints ``prog: error: ...`` and returns 1. Ctrl-C (KeyboardInterrupt) prints ``prog: stopped;
    rerun the same command to resume`` and returns 130: the stack has unwound by then (temporary
    files removed, locks released), and every command resumes from what it finished. Everything else
    propagates with its traceback. The C allocator is set for tensor work first
    (`index.core.allocator`).
    """
    tune_allocator()
    try:
        rc = main(argv)
    except KeyboardInterrupt:
        print(f"{prog}: {STOPPED}", file=sys.stderr, flush=True)
        return INTERRUPTED
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        return 2
    except OSError as e:
        if e.errno not in _DISK_FULL:
            raise
        print(f"{prog}: error: {e.filename or 'a file'}: {e.strerror} (disk full or file size limit); nothing "
              "was left half-written: free space and rerun, finished work is reused", file=sys.stderr, flush=True)
        return 1
    return rc if isinstance(rc, int) else 0


_DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
STOPPED = "stopped; rerun the same command to resume"
INTERRUPTED = 130   # exit status after Ctrl-C: 128 + SIGINT, as a shell reports a process SIGINT ended

"""The one base exception for a user's mistake: a bad config, an unknown name, a missing or foreign path.

Every command-line entry point catches `UserError` and prints `prog: error: <message>` with exit
status 2 (argparse's convention); anything else is a bug and keeps its traceback. Subclasses also
derive from the built-in exception a caller would expect (`KeyError`, `FileNotFoundError`, ...), so
`except ValueError` keeps working where it did.
"""
from __future__ import annotations


class UserError(Exception):
    """Raised for input the user can fix; the message says what is wrong and, where there are
    choices, what the valid ones are."""

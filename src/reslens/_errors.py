"""What the caller must fix, told apart from a bug: the model-file error and the command line's rule.

reslens refuses bad input with ``ValueError`` / ``TypeError`` (and ``OSError`` / ``ImportError`` for
files and extras) raised by its own ``raise`` statements. An error of the same classes that an
operation throws inside reslens or deeper (``len(None)``, a library's own check) is a bug to report:
the command line shows it with its traceback instead of one line.
"""

from __future__ import annotations

import dis
from pathlib import Path

__all__ = ["ModelFileError", "is_refusal"]

_PACKAGE = Path(__file__).resolve().parent
_RAISE = dis.opmap["RAISE_VARARGS"]


class ModelFileError(OSError):
    """A model file or folder reslens cannot read right; the message names it and how to repair it."""


def is_refusal(error: BaseException) -> bool:
    """Whether ``error`` is reslens refusing what it was given, not a bug.

    True when a ``raise`` statement of reslens's own code threw it (a check, a loader, a library error
    wrapped with ``raise ... from``), and for an ``OSError`` the system raised about a file (it has an
    ``errno``: permission denied, disk full, no such file).
    """
    if isinstance(error, OSError) and error.errno is not None:
        return True
    tb = error.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:  # the innermost frame: where the error was thrown
        tb = tb.tb_next
    code = tb.tb_frame.f_code
    try:
        in_reslens = Path(code.co_filename).resolve().is_relative_to(_PACKAGE)
        return in_reslens and code.co_code[tb.tb_lasti] == _RAISE
    except (OSError, IndexError, ValueError):
        return False

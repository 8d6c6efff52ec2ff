"""One base class for every error a user can fix (issue 15's error policy).

The CLI prints a ``FastblipError`` as one line naming the file and the reason (``-v`` shows the traceback);
anything else is a bug and prints its full traceback. Library code raises these; it never imports the CLI.
"""

from __future__ import annotations


class FastblipError(Exception):
    """Input the user can fix: a bad recipe key, a missing or wrong file, an unavailable backend."""

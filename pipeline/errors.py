"""The one exception type that means "the user's input is wrong".

The CLI turns it into a single line on stderr and exit code 2, never a traceback.
Messages should name the file and the field or item that is wrong.
"""
from __future__ import annotations

from pathlib import Path


class InputError(Exception):
    """Bad user input (file, field, option). ``str(err)`` is the one line shown to the user."""

    def __init__(self, message: str, path: str | Path | None = None):
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {message}" if self.path else message)

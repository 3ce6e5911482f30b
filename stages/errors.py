"""How the CLI reports bad input: one line on stderr, exit code 2, no traceback."""
from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

import typer

from pipeline.errors import InputError

F = TypeVar("F", bound=Callable)

EXIT_BAD_INPUT = 2


def fail(message: str) -> typer.Exit:
    """Print ``error: message`` to stderr and return the exit to raise."""
    print(f"error: {message}", file=sys.stderr)
    return typer.Exit(EXIT_BAD_INPUT)


def user_errors(fn: F) -> F:
    """Decorator for CLI commands: ``InputError`` -> one stderr line + exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except InputError as err:
            raise fail(str(err)) from None

    return wrapper  # type: ignore[return-value]

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


class UnreadableImage(InputError):
    """An image file of a dataset that cannot be decoded. A loader built with
    ``skip_unreadable`` lists it in its batches instead of failing (``pipeline.batching``)."""

    def __init__(self, reason: str, path: str | Path, image_id: int, file_name: str):
        self.reason, self.image_id, self.file_name = reason, image_id, file_name
        super().__init__(f"image cannot be read: {reason}", path)

    def __reduce__(self):  # keeps the fields across DataLoader worker processes
        return type(self), (self.reason, self.path, self.image_id, self.file_name)

    def record(self) -> dict:
        """``{"image_id", "file_name", "error"}``: how outputs list a skipped image."""
        return {"image_id": self.image_id, "file_name": self.file_name, "error": self.reason}

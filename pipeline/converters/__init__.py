"""Dataset converters: public dataset label formats -> COCO instances JSON.

One module per dataset, each with one ``convert_*`` function that the CLI
(``uplvp data convert ...``) calls:

- :func:`pipeline.converters.cityscapes.convert_cityscapes`
- :func:`pipeline.converters.ctw1500.convert_ctw1500`

This package module holds the two helpers both converters share (image size from a file
header, an optional rich progress bar). See ``docs/converters.md``.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TypeVar

from PIL import Image, UnidentifiedImageError
from rich.progress import track

from pipeline.errors import InputError

T = TypeVar("T")


def image_size(path: Path) -> tuple[int, int]:
    """``(height, width)`` in pixels of the image file at ``path``, read from its header only.

    Raises :class:`InputError` naming the file when it is missing or not a readable image.
    """
    try:
        with Image.open(path) as img:
            width, height = img.size
    except FileNotFoundError:
        raise InputError("image file not found", path) from None
    except (UnidentifiedImageError, OSError) as err:
        raise InputError(f"cannot read image ({err.__class__.__name__})", path) from None
    return int(height), int(width)


def progress_iter(items: list[T], description: str, enabled: bool) -> Iterator[T]:
    """Iterate ``items``, showing a rich progress bar on the terminal when ``enabled``."""
    iterable: Iterable[T] = track(items, description=description, total=len(items),
                                  disable=not enabled, transient=True)
    yield from iterable

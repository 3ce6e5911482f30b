"""Named components: a :class:`Registry` maps a name to a constructor and what belongs to it.

    DECODERS = Registry("decoder")

    @DECODERS.register("knet", reference_mask_weights={"bce": 1.0, "dice": 4.0})
    class KNetDecoder(nn.Module): ...

    DECODERS.get("knet")            # the class
    DECODERS.info("knet")           # {"reference_mask_weights": {...}}
    DECODERS.names()                # ("knet", ...), in registration order

As detectron2's and Mask2Former's registries: a new decoder or proposer registers itself in its
own module and is then selectable by name in configs; nothing else lists the names. The
registries of this package are filled by importing their packages (``uplvp_model.decoders``,
``uplvp_model.proposal.factory``).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class Registry:
    """Name -> (object, metadata) for one kind of component (``kind`` names it in errors)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, tuple[Any, dict[str, Any]]] = {}

    def register(self, name: str, **info: Any) -> Callable[[T], T]:
        """Decorator: register the decorated object under ``name`` with ``info``; a name
        registered twice raises ``ValueError``."""
        def add(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = (obj, dict(info))
            return obj
        return add

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def check(self, name: str) -> str:
        """``name`` if registered, else ``ValueError`` listing the registered names."""
        if name not in self._entries:
            raise ValueError(f"unknown {self.kind} {name!r}; choose one of "
                             f"{', '.join(self._entries)}")
        return name

    def get(self, name: str) -> Any:
        return self._entries[self.check(name)][0]

    def info(self, name: str) -> dict[str, Any]:
        return dict(self._entries[self.check(name)][1])

    def __contains__(self, name: object) -> bool:
        return name in self._entries

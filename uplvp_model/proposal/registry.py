"""The registry of mask proposers: a proposer module registers its class here by name;
``factory.build_proposer`` imports every proposer module and builds one by name."""
from __future__ import annotations

from ..registry import Registry

PROPOSERS = Registry("proposer")

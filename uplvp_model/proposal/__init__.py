"""Pseudo-mask proposers for the ``propose`` stage (``clip``, ``freemask``, ``maskcut``,
``classical``): each registers itself by name (``registry.py``); ``factory.build_proposer``
builds one. Kept light: importing this package imports no proposer."""
from .base import ProposedMask, Proposer

__all__ = ["ProposedMask", "Proposer"]

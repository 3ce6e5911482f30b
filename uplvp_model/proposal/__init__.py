"""Pseudo-mask proposers for the ``propose`` stage (``clip``, ``freemask``, ``maskcut``,
``classical``)."""
from .base import PROPOSER_NAMES, ProposedMask, Proposer, build_proposer

__all__ = ["PROPOSER_NAMES", "ProposedMask", "Proposer", "build_proposer"]

"""Tools that make what the package ships or reads: the toy CLIP (``train_clip``, ``ship_clip``),
the ImageNet backbone file (``imagenet_backbone``), and the pseudo-mask quality report
(``propose_quality``). Run from the repository root as modules, e.g. ``python -m
tools.train_clip``; kept outputs in ``tools/results/``. Nothing in the package imports them.
"""

"""The low-data study and the peer comparison: the experiments behind docs/results.md.

Run from the repository root as modules, e.g. ``python -m experiments.low_data_study --config
experiments/study/12_real_photos.yaml --out runs/study_real``; their kept outputs are in
``experiments/results/``. Importable (``from experiments.peer_models import build_maskrcnn_tiny``);
nothing in ``pipeline``, ``uplvp_model`` or ``stages`` imports them.
"""

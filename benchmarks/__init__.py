"""Performance measurements (speed, memory, the demo's targets) that print what they measured;
their kept outputs are in ``benchmarks/results/``. Run from the repository root as modules, e.g.
``python -m benchmarks.inference_cpu``. Nothing in the package imports them.
"""

"""Orchestration and storage for uplvp: manifests, COCO files, shards, Ray execution.

Knows files, formats and processes; holds no model code.
"""

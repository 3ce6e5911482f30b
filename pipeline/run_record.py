"""``stage.json``: the record every stage run writes into its output directory.

Holds the stage name, resolved config, config hash, inputs, package versions, start/end time and
counts (see ``docs/contracts.md``). Written atomically.
"""
from __future__ import annotations

import platform
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from pipeline.atomic import write_json_atomic

RUN_RECORD_FORMAT_VERSION = 1
_PACKAGES = ("uplvp", "torch", "torchvision", "open_clip_torch", "ray", "pyarrow", "numpy")


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def write_run_record(
    out_dir: str | Path,
    *,
    stage: str,
    config: dict[str, Any],
    config_hash: str,
    inputs: dict[str, Any],
    counts: dict[str, Any],
    started_at: str,
    finished_at: str | None = None,
    file_name: str = "stage.json",
) -> Path:
    path = Path(out_dir) / file_name
    write_json_atomic(
        path,
        {
            "format_version": RUN_RECORD_FORMAT_VERSION,
            "stage": stage,
            "config": config,
            "config_hash": config_hash,
            "inputs": inputs,
            "counts": counts,
            "started_at": started_at,
            "finished_at": finished_at or now_iso(),
            "host": platform.node(),
            "versions": package_versions(),
        },
        indent=2,
    )
    return path

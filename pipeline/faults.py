"""Test hook: deterministic fault injection at named points of the shard work.

Inert unless the environment variable ``UPLVP_FAULT_INJECT`` is set; reliability tests set it to
make a worker block (so the test can SIGKILL it at a known point), exit abruptly (a dying Ray
actor) or raise (a shard that keeps failing). Never set it in production runs.

Format: comma-separated ``key=value`` pairs, for example
``point=between-files,shard=1,action=block,flag=/tmp/x/blocked``:

- ``point``: where it fires, one of :data:`POINTS`.
- ``shard``: the shard index it fires for, or ``*`` for any shard (the first one the process
  reaches, with ``flag``).
- ``action``: ``block`` (sleep until killed), ``exit`` (``os._exit(1)``, no cleanup) or
  ``raise`` (``RuntimeError``).
- ``flag`` (optional): a file path. The fault fires only while that file does not exist, and
  the file is created just before it fires: ``block`` announces it is blocked, ``exit`` fires
  on the first attempt only.

``UPLVP_FAULT_INJECT=@FILE`` reads the rule from FILE at every fault point instead (empty file:
no fault), so a test can change the fault between runs of long-lived Ray actors, whose
environment is fixed when Ray starts.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

ENV_VAR = "UPLVP_FAULT_INJECT"
POINTS = ("before-write", "mid-write", "between-files")
ACTIONS = ("block", "exit", "raise")


def fault_point(point: str, shard: int) -> None:
    """Fire the configured fault if ``point`` and ``shard`` match ``$UPLVP_FAULT_INJECT``."""
    spec = os.environ.get(ENV_VAR)
    if spec and spec.startswith("@"):
        spec = Path(spec[1:]).read_text().strip()
    if not spec:
        return
    rule = dict(item.split("=", 1) for item in spec.split(",") if "=" in item)
    if rule.get("point") not in POINTS or rule.get("action") not in ACTIONS:
        raise ValueError(f"{ENV_VAR}={spec!r}: point must be one of {POINTS}, action of {ACTIONS}")
    if rule["point"] != point:
        return
    if rule.get("shard") != "*" and int(rule.get("shard", -1)) != shard:
        return
    flag = rule.get("flag")
    if flag is not None:
        if Path(flag).exists():
            return
        Path(flag).touch()
    if rule["action"] == "exit":
        os._exit(1)
    if rule["action"] == "raise":
        raise RuntimeError(f"injected fault at {point} of shard {shard}")
    while True:  # block: wait to be killed
        time.sleep(0.1)

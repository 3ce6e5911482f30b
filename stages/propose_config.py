"""The propose stage's config and what it resolves: the proposer's options, its vocabulary, and
which weights it runs with (a checkpoint, a CLIP shipped with the package, or random weights
only when asked for)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import field_validator

from pipeline.engine.distributed import resolve_device
from pipeline.errors import InputError
from pipeline.text_embeddings import TEXT_EMBEDDINGS_FILE
from stages.config import StageConfig
from uplvp_model.proposal.factory import PROPOSERS

BACKBONE_PROPOSERS = ("freemask", "maskcut")  # read --backbone-checkpoint
TEXT_CACHE_FILE = TEXT_EMBEDDINGS_FILE  # the text loss of `pretrain` reads it (docs/shards.md)


class ProposeConfig(StageConfig):
    images: Path  # dataset manifest of the (unlabeled) images
    out: Path
    proposer: str = "classical"  # a registered proposer: classical, clip, freemask, maskcut
    clip_model: str = "ViT-B-16"
    clip_checkpoint: str | None = None
    backbone_checkpoint: str | None = None
    random_weights: bool = False  # allow clip / freemask without a checkpoint (tests, speed)
    vocabulary: Path | None = None
    top_k: int | None = 20  # at most this many masks per image (best first); None or 0: no cap
    min_score: float | None = None  # masks scoring under this are dropped; None: the proposer's
    min_area: int = 32
    options: dict[str, Any] = {}  # further proposer keyword options (see docs/proposers.md)
    shard_size: int = 64
    batch_size: int = 8
    max_side: int = 1024
    grid_size: int = 32
    device: str = "auto"
    # how to run; these do not change the output and are excluded from the config hash
    num_workers: int = 2
    ray_address: str | None = None
    shards: str | None = None
    shard_index: int | None = None
    num_shards: int | None = None
    overwrite: bool = False

    HASH_EXCLUDE = frozenset(
        {"images", "out", "device", "num_workers", "ray_address", "shards", "shard_index",
         "num_shards", "overwrite", "random_weights"}
    )

    @field_validator("proposer")
    @classmethod
    def _known_proposer(cls, value: str) -> str:
        return PROPOSERS.check(value)


def proposer_options(cfg: ProposeConfig) -> dict[str, Any]:
    """Keyword options for ``build_proposer(cfg.proposer, ...)``."""
    options: dict[str, Any] = {"top_k": cfg.top_k or None, "min_area": cfg.min_area}
    if cfg.min_score is not None:
        options["min_score"] = cfg.min_score
    if cfg.proposer == "clip":
        options.update(model_name=cfg.clip_model, checkpoint=cfg.clip_checkpoint,
                       random_weights=cfg.random_weights)
        options["device"] = resolve_device(cfg.device)
        # text embeddings are computed once per (model, vocabulary) and reused by every actor
        # and every rerun; the file carries its key, so a stale one is recomputed
        options["text_cache_file"] = str(Path(cfg.out) / TEXT_CACHE_FILE)
        if cfg.vocabulary is not None:
            options["vocabulary"] = read_vocabulary(cfg.vocabulary)
    elif cfg.proposer in BACKBONE_PROPOSERS:
        options.update(checkpoint=cfg.backbone_checkpoint, random_weights=cfg.random_weights,
                       device=resolve_device(cfg.device))
    options.update(cfg.options)
    return options


def read_vocabulary(path: Path) -> list[str]:
    """One class name per line; blank lines and ``#`` comments ignored."""
    if not Path(path).is_file():
        raise InputError("vocabulary file not found", path)
    names = [
        line.strip()
        for line in Path(path).read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if not names:
        raise InputError("vocabulary file has no names", path)
    if len(set(names)) != len(names):
        raise InputError("vocabulary file lists a name twice", path)
    return names


def check_weights_given(cfg: ProposeConfig) -> None:
    """A model-based proposer without weights is refused (one line) unless ``random_weights``:
    random weights give meaningless masks that every later stage would accept."""
    backbone = ("--backbone-checkpoint FILE", cfg.backbone_checkpoint,
                "local backbone weights; `uplvp stage backbone` trains them without labels")
    missing = {"clip": ("--clip-checkpoint FILE", cfg.clip_checkpoint,
                        "open_clip weights for --clip-model; tools/train_clip.py trains one"),
               "freemask": backbone, "maskcut": backbone}.get(cfg.proposer)
    if missing is None or missing[1] is not None or cfg.random_weights:
        return
    if cfg.proposer == "clip" and shipped_clip(cfg.clip_model):
        return  # a model the package ships: its weights come with it
    option, _, what = missing
    raise InputError(
        f"--proposer {cfg.proposer} needs {option} ({what}): without weights its masks are "
        "meaningless; pass --random-weights only for a speed or test run"
    )


def shipped_clip(name: str) -> bool:
    """Whether ``name`` is a CLIP the package ships (selected by name, no checkpoint)."""
    from uplvp_model.proposal.shipped import is_shipped

    return is_shipped(name)


def proposal_weights(cfg: ProposeConfig) -> dict[str, str]:
    """Which weights make this run's masks (shard metadata and stage.json ``inputs``):
    ``kind`` none (weight-free classical) | checkpoint | random, and ``source``."""
    if cfg.proposer == "classical":
        return {"kind": "none", "source": "classical (weight-free)"}
    checkpoint = cfg.clip_checkpoint if cfg.proposer == "clip" else cfg.backbone_checkpoint
    model = cfg.clip_model if cfg.proposer == "clip" else backbone_name(cfg)
    if checkpoint is None and cfg.proposer == "clip" and shipped_clip(cfg.clip_model):
        from uplvp_model.proposal.shipped import shipped_model

        card = shipped_model(cfg.clip_model, verify=False).card
        return {"kind": "shipped", "source": f"clip {model}: shipped with uplvp, sha256 "
                                             f"{card['sha256']}"}
    if checkpoint is None:
        return {"kind": "random", "source": f"{cfg.proposer} {model}: random init"}
    return {"kind": "checkpoint", "source": f"{cfg.proposer} {model}: {checkpoint}"}


def backbone_name(cfg: ProposeConfig) -> str:
    """The backbone a freemask / maskcut run reads: its ``backbone`` option, else the one its
    checkpoint names, else ResNet-50 (``uplvp_model.proposal.features``)."""
    from uplvp_model.proposal.features import DEFAULT_BACKBONE, checkpoint_architecture

    if cfg.options.get("backbone"):
        return str(cfg.options["backbone"])
    try:
        named, _ = checkpoint_architecture(cfg.backbone_checkpoint)
    except ValueError as err:  # the proposer's loader reports it; here only the name matters
        raise InputError(str(err)) from None
    return named or DEFAULT_BACKBONE

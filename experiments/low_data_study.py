"""The low-data study: does UPLVP pre-training pay off, by how much, and which part matters.

    .venv/bin/python -m experiments.low_data_study --out runs/study              # run / resume
    .venv/bin/python -m experiments.low_data_study --out runs/study --report-only \
        --results-md docs/results.md                                            # re-plot only

One synthetic benchmark (larger than the demo) -> one `propose` run (classical) -> one
pre-training run per pre-trained arm -> for every (regime, arm, seed) cell a fine-tuning run on
that seed's low-data subset of the labeled pool, all with identical fine-tuning budgets, then
`evaluate` of the final checkpoint on the val set. Every finished cell is a line in
``results.jsonl``; rerunning skips finished cells (and every stage itself resumes), so the study
survives interruption. ``--report-only`` rebuilds the tables and plots from ``results.jsonl`` and
the runs' ``metrics.jsonl`` without training.

Arms: ``scratch``; ``no_inject`` (pre-trained on pseudo masks without prompt injection);
``full`` (UPLVP: all prompt ingredients, spread matching); ``no_position`` / ``no_shape`` /
``no_embedding`` (one ingredient removed); ``cosine`` / ``hungarian`` (other matching);
``clip`` (as ``full``, but pseudo masks, labels and embeddings from the ``clip`` proposer on the
CLIP trained by ``tools/train_clip.py``: ``clip_checkpoint``) and ``clip_text`` (``clip``
plus the CLIP text loss, weight ``text_weight``).

Decoders: our ``knet`` and ``mask2former``, and ``maskrcnn``, the CNN model of the paper's claim:
torchvision's Mask R-CNN on the same tiny CNN backbone with FPN and heads at our decoders' width
(``experiments/peer_models.py`` ``build_maskrcnn_tiny``), ``scratch`` cells only, trained and
scored on the same subsets, loader, budget and val set by ``peer_models.train_peer`` /
``score_peer`` (its evaluation also lands in ``finetune/<cell>/evaluate/metrics.json``).
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import statistics
import time
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict


from pipeline.atomic import write_text_atomic
from pipeline.coco import load_coco, write_coco
from pipeline.errors import InputError
from pipeline.manifest import load_manifest, write_manifest
from pipeline.splits import format_percent, sample_subsets, subset_coco
from pipeline.synth import write_synth_dataset
from pipeline.engine.metrics import ap_curve
from pipeline.evaluation.curves import steps_to_reach
from stages.evaluate import EvaluateConfig, run_evaluate
from stages.finetune import FinetuneConfig, run_finetune
from stages.pretrain import LossSection, PretrainConfig, PromptSection, run_pretrain
from stages.propose import ProposeConfig, run_propose
from pipeline.engine.metrics import METRICS_FILE
from pipeline.engine import TrainConfig
from stages.training_setup import DataSection, ModelSection

# prompt-section changes of each pre-trained arm (None: the arm is not pre-trained)
ARMS: dict[str, dict[str, Any] | None] = {
    "scratch": None,
    "no_inject": {"inject": False},
    "full": {},
    "no_position": {"use_position": False},
    "no_shape": {"use_shape": False},
    "no_embedding": {"use_embedding": False},
    "cosine": {"strategy": "cosine"},
    "hungarian": {"strategy": "hungarian"},
    "clip": {},
    "clip_text": {},
}
# arms pre-trained on the pseudo masks and embeddings of the trained CLIP (`propose_clip/`,
# StudyConfig.clip_*) instead of the classical proposer's, with these loss-section changes
CLIP_ARMS: dict[str, dict[str, Any]] = {"clip": {}, "clip_text": {"text": "text_weight"}}
# our decoders, and the CNN peer of the paper's claim: torchvision's Mask R-CNN on the study's
# tiny CNN backbone at the width of our decoders (experiments/peer_models.py
# build_maskrcnn_tiny), trained from scratch only, with the same loader, subsets, steps, batch,
# lr, schedule and evaluation as our cells (value: the peer's backbone depth)
DECODERS = ("knet", "mask2former", "maskrcnn")
PEER_DECODERS = {"maskrcnn": "tiny"}


class StudyConfig(BaseModel):
    """Everything the study runs with; the defaults are what docs/results.md reports."""

    model_config = ConfigDict(extra="forbid")

    data_seed: int = 0
    num_unlabeled: int = 1000
    num_labeled_pool: int = 400
    num_val: int = 100
    image_size: int = 192
    regimes: list[float] = [1, 5, 10, 100]
    seeds: list[int] = [0, 1, 2]
    arms: list[str] = list(ARMS)
    decoders: list[str] = ["knet"]
    model: dict[str, Any] = {"preset": "tiny",
                             "overrides": {"hidden_dim": 64, "num_kernels": 20, "ffn_dim": 128}}
    batch_size: int = 8
    short_side: tuple[int, int] = (160, 208)
    eval_short_side: int = 192
    max_long_side: int = 288
    propose_workers: int = 2
    pretrain_steps: int = 2000
    pretrain_lr: float = 5e-4
    min_score: float = 0.5
    finetune_steps: int = 1000
    finetune_lr: float = 5e-4
    eval_every: int = 100
    # the clip arms' proposer (fields added after the first cells ran; folders recorded without
    # them still resume, record_config compares only recorded keys)
    clip_model: str = "tools/clip/uplvp-synth-vit.json"
    clip_checkpoint: str | None = None
    clip_options: dict[str, Any] = {}
    text_weight: float = 1.0
    # which predictions assign targets to each decoder stage in pre-training and fine-tuning
    # (FinetuneConfig.stage_assignment); folders recorded without it were trained with "own"
    # (RECORDED_BEFORE)
    stage_assignment: Literal["own", "previous"] = "previous"
    # (fields below added for issue 32; their defaults are what earlier folders ran with)
    # the images: "synthetic" (generated from data_seed: num_unlabeled, num_labeled_pool,
    # num_val, image_size) or "real": the labeled pool, val set and unlabeled pool of the
    # manifests below (e.g. the small COCO sets of ../shared/data)
    data: Literal["synthetic", "real"] = "synthetic"
    train_manifest: str | None = None
    val_manifest: str | None = None
    unlabeled_manifest: str | None = None
    # ProposeConfig fields of the unlabeled pool's proposals (default: the classical proposer)
    proposer: dict[str, Any] = {}
    # the paper's setting: one backbone (weights file or `uplvp stage backbone` run) under every
    # arm and under the Mask R-CNN peer; UPLVP pre-trains with it frozen, fine-tuning trains it
    # (at backbone_lr_multiplier; the reference: 0.25) or keeps it frozen
    backbone_checkpoint: str | None = None
    pretrain_freeze_backbone: bool = True
    finetune_backbone: Literal["train", "frozen"] = "train"
    backbone_lr_multiplier: float = 1.0
    # the Mask R-CNN peer's FPN and head width (None: 64, the tiny study's); the peer sits on
    # the preset's backbone
    peer_width: int | None = None


# fields that choose which cells run; every other field defines the benchmark itself
SELECTION_FIELDS = ("regimes", "seeds", "arms", "decoders")
# benchmark fields added later whose absence from a recorded study.yaml means another value
# than today's default: such a folder is compared as if it recorded this value
RECORDED_BEFORE = {"stage_assignment": "own"}
# files that moved without changing (benchmarks/ was split into benchmarks/, experiments/ and
# tools/): a folder that recorded the old path resumes under the new one
MOVED_PATHS = {"benchmarks/clip/": "tools/clip/"}


def moved(value):
    """``value`` with a recorded path under a moved folder rewritten to where it is now."""
    if isinstance(value, str):
        for old, new in MOVED_PATHS.items():
            if value.startswith(old):
                return new + value[len(old):]
    return value


def run_study(cfg: StudyConfig, out: Path, poll_seconds: float = 10.0) -> None:
    """Run every cell of ``cfg`` not yet in ``results.jsonl``.

    Several processes may run on one ``out`` at once (one per core, ``--threads 1``): each cell
    and each pre-training run is held under an exclusive file lock while it runs, a process
    skips cells whose lock another process holds (and returns once only such cells are left)
    and defers cells whose pre-training another process is running (waiting for those). Locks
    die with their process, so a killed worker leaves nothing to clean up: rerunning redoes
    its cell (every stage resumes from its checkpoints).
    """
    out.mkdir(parents=True, exist_ok=True)
    with file_lock(out / "locks" / "prepare.lock"):
        record_config(cfg, out)
        data = prepare_data(cfg, out)
    cells = study_cells(cfg)
    while True:
        ran = deferred = False
        for cell in cells:
            if cell_key(cell) in {cell_key(r) for r in read_results(out)}:
                continue  # done (possibly by another process meanwhile)
            with try_lock(out / "locks" / f"cell-{cell_name(cell)}.lock") as got_cell:
                if not got_cell:
                    continue  # another process is running it
                if cell_key(cell) in {cell_key(r) for r in read_results(out)}:
                    continue
                result = run_cell(cfg, out, data, cell)
                if result is None:
                    deferred = True  # its pre-training is running in another process
                    continue
                with open(out / "results.jsonl", "a", encoding="utf-8") as fh:
                    fh.write(json.dumps(result) + "\n")  # one short append: atomic on POSIX
                ran = True
                print(f"cell done: {cell} -> AP {100 * result['AP']:.1f} "
                      f"({result['seconds']:.0f} s)", flush=True)
        if not deferred and not ran:
            return  # every cell is done or being run by another (live) process
        if deferred and not ran:
            time.sleep(poll_seconds)  # wait for another process's pre-training


def study_cells(cfg: StudyConfig) -> list[dict]:
    """Every selected (decoder, regime, seed, arm) cell; a peer decoder (Mask R-CNN) has only
    its ``scratch`` cells: our pre-training does not apply to it."""
    return [{"decoder": decoder, "regime": regime, "seed": seed, "arm": arm}
            for decoder in cfg.decoders for regime in cfg.regimes
            for seed in cfg.seeds for arm in cfg.arms
            if decoder not in PEER_DECODERS or arm == "scratch"]


def cell_name(cell: dict) -> str:
    return f"{cell['decoder']}-{format_percent(cell['regime'])}pct-seed{cell['seed']}-{cell['arm']}"


@contextlib.contextmanager
def file_lock(path: Path):
    """Exclusive lock on ``path`` (blocking); released on exit or when the process dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def try_lock(path: Path):
    """Like ``file_lock`` but never waits: yields False when another process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def record_config(cfg: StudyConfig, out: Path) -> None:
    """``study.yaml``: the benchmark fields (fixed for the folder) and the union of the cells
    selected by every invocation. A folder made with other benchmark fields is refused, so
    cells of different benchmarks never share one table."""
    path = out / "study.yaml"
    current = cfg.model_dump(mode="json")
    if path.is_file():
        recorded = {key: moved(value) for key, value in
                    {**RECORDED_BEFORE, **(yaml.safe_load(path.read_text()) or {})}.items()}
        differ = sorted(k for k in current if k not in SELECTION_FIELDS
                        and k in recorded and recorded[k] != current[k])
        if differ:
            raise InputError(f"{path}: this folder holds a study with other settings "
                             f"({', '.join(differ)}); use another --out")
        for key in SELECTION_FIELDS:
            merged = list(recorded.get(key, []))
            merged += [v for v in current[key] if v not in merged]
            current[key] = merged
    write_text_atomic(path, yaml.safe_dump(current, sort_keys=False))


def prepare_data(cfg: StudyConfig, out: Path) -> dict[str, Path]:
    """The benchmark's manifests (``train``: the labeled pool, ``val``, ``unlabeled``; a
    synthetic benchmark is generated first, skipped when already complete); ``splits``: where
    the low-data subsets go."""
    if cfg.data == "real":
        missing = [f for f in ("train_manifest", "val_manifest", "unlabeled_manifest")
                   if getattr(cfg, f) is None]
        if missing:
            raise InputError(f"data: real needs {', '.join(missing)}")
        data = {"train": Path(cfg.train_manifest), "val": Path(cfg.val_manifest),
                "unlabeled": Path(cfg.unlabeled_manifest), "splits": out / "splits"}
    else:
        data_dir = out / "data"
        marker = data_dir / "study_data.done"
        if not marker.is_file():
            write_synth_dataset(data_dir, seed=cfg.data_seed, num_unlabeled=cfg.num_unlabeled,
                                num_train=cfg.num_labeled_pool, num_val=cfg.num_val,
                                image_size=cfg.image_size, progress=True)
            write_text_atomic(marker, "synthetic benchmark complete\n")
        data = {"train": data_dir / "train.yaml", "val": data_dir / "val.yaml",
                "unlabeled": data_dir / "unlabeled.yaml", "splits": data_dir / "splits",
                "data": data_dir}
    return data


def proposal_shards(cfg: StudyConfig, out: Path, data: dict[str, Path]) -> Path:
    """The study proposer's shards of the unlabeled pool, made under a lock by the first cell
    that pre-trains (a study of scratch and Mask R-CNN cells never proposes); every rerun skips
    the complete shards."""
    with file_lock(out / "locks" / "propose.lock"):
        code = run_propose(ProposeConfig(images=data["unlabeled"], out=out / "propose",
                                         shard_size=50, num_workers=cfg.propose_workers,
                                         **cfg.proposer), progress=False)
    if code:
        raise SystemExit(f"propose failed (exit {code})")
    return out / "propose"


def clip_shards(cfg: StudyConfig, out: Path, data: dict[str, Path]) -> Path:
    """The clip proposer's shards of the unlabeled pool (vocabulary: the benchmark's category
    names), made once under a lock; every rerun skips the complete shards."""
    from uplvp_model.proposal.shipped import is_shipped

    if cfg.clip_checkpoint is None and not is_shipped(cfg.clip_model):
        raise InputError("the clip arms need clip_checkpoint (tools/train_clip.py) or "
                         "clip_model naming a shipped model (uplvp-synth-vit)")
    vocabulary = out / "propose_clip_vocabulary.txt"
    categories = load_manifest(data["val"]).categories
    with file_lock(out / "locks" / "propose_clip.lock"):
        write_text_atomic(vocabulary, "".join(f"{c['name']}\n" for c in categories))
        code = run_propose(ProposeConfig(
            images=data["unlabeled"], out=out / "propose_clip", proposer="clip",
            clip_model=cfg.clip_model, clip_checkpoint=cfg.clip_checkpoint,
            vocabulary=vocabulary, options=cfg.clip_options, shard_size=50,
            num_workers=cfg.propose_workers, device="cpu"), progress=False)
    if code:
        raise SystemExit(f"clip propose failed (exit {code})")
    return out / "propose_clip"


def subset_manifest(cfg: StudyConfig, data: dict[str, Path], regime: float, seed: int) -> Path:
    """The seed's ``regime``% image-level subset of the labeled pool (``pipeline.splits``, as
    ``uplvp data split`` makes them), as a manifest in ``data["splits"]``."""
    stem = f"train.{seed}@{format_percent(regime)}"
    manifest = data["splits"] / f"{stem}.yaml"
    if not manifest.is_file():
        pool = load_manifest(data["train"])
        (subset,) = sample_subsets([im["id"] for im in pool.coco["images"]], [regime], seed)
        write_coco(data["splits"] / f"{stem}.json", subset_coco(pool.coco, subset.image_ids))
        write_manifest(manifest, stem, pool.root, annotations=data["splits"] / f"{stem}.json")
    return manifest


def model_section(cfg: StudyConfig, decoder: str, stage: str) -> ModelSection:
    """The model of every arm: the study's preset and overrides, and in the paper's setting
    (``backbone_checkpoint``) the shared backbone, frozen in pre-training (as the reference)
    and in fine-tuning when ``finetune_backbone`` is ``frozen``."""
    fields: dict[str, Any] = {**cfg.model, "decoder": decoder}
    if cfg.backbone_checkpoint is not None:
        fields["backbone_checkpoint"] = cfg.backbone_checkpoint
        fields["freeze_backbone"] = (cfg.pretrain_freeze_backbone if stage == "pretrain"
                                     else cfg.finetune_backbone == "frozen")
    elif cfg.finetune_backbone == "frozen" and stage == "finetune":
        fields["freeze_backbone"] = True
    return ModelSection(**fields)


def data_section(cfg: StudyConfig, seed: int, max_batch: int | None = None) -> DataSection:
    """Loader settings; ``max_batch`` caps the batch at a tiny subset's size (1 % of a small
    pool can hold fewer images than one batch; the step budget stays the same)."""
    batch = cfg.batch_size if max_batch is None else max(1, min(cfg.batch_size, max_batch))
    return DataSection(batch_size=batch, short_side=cfg.short_side,
                       max_long_side=cfg.max_long_side, eval_short_side=cfg.eval_short_side,
                       num_workers=0, seed=seed)


def pretrained_run(cfg: StudyConfig, out: Path, shards: Path, decoder: str,
                   arm: str) -> Path | None:
    """The arm's finished pre-training run (run or resumed here); None while another process
    is running it."""
    run_dir = out / "pretrain" / f"{decoder}-{arm}"
    with try_lock(out / "locks" / f"pretrain-{decoder}-{arm}.lock") as got:
        if not got:
            return None
        pretrain(cfg, shards, decoder, arm, run_dir)
    return run_dir


def pretrain(cfg: StudyConfig, shards: Path, decoder: str, arm: str, run_dir: Path) -> None:
    prompt = PromptSection(**ARMS[arm])
    loss = {key: getattr(cfg, field) for key, field in CLIP_ARMS.get(arm, {}).items()}
    run_pretrain(
        PretrainConfig(
            shards=shards, out=run_dir, model=model_section(cfg, decoder, "pretrain"),
            prompt=prompt, loss=LossSection(num_points=None, stage_assignment=cfg.stage_assignment,
                                            **loss),
            masks={"min_score": cfg.min_score}, data=data_section(cfg, 0),
            train=TrainConfig(max_steps=cfg.pretrain_steps, lr=cfg.pretrain_lr,
                              warmup_steps=min(100, cfg.pretrain_steps // 10),
                              checkpoint_every=max(1, cfg.pretrain_steps // 4), log_every=50,
                              progress=False),
            resume=True,
        ),
        progress=False,
    )


def run_cell(cfg: StudyConfig, out: Path, data: dict[str, Path], cell: dict) -> dict | None:
    """Fine-tune + evaluate one cell; None when its pre-training is running elsewhere."""
    import torch

    decoder, regime, seed, arm = cell["decoder"], cell["regime"], cell["seed"], cell["arm"]
    t0 = time.perf_counter()
    init = "none"
    if ARMS[arm] is not None:
        shards = (clip_shards(cfg, out, data) if arm in CLIP_ARMS
                  else proposal_shards(cfg, out, data))
        pretrained = pretrained_run(cfg, out, shards, decoder, arm)
        if pretrained is None:
            return None
        init = str(pretrained)
    run_dir = out / "finetune" / cell_name(cell)
    train_manifest = subset_manifest(cfg, data, regime, seed)
    subset_size = len(load_coco(train_manifest.with_suffix(".json"))["images"])
    train_cfg = TrainConfig(max_steps=cfg.finetune_steps, lr=cfg.finetune_lr,
                            warmup_steps=min(50, cfg.finetune_steps // 10),
                            eval_every=cfg.eval_every, log_every=50, seed=seed,
                            checkpoint_every=max(1, cfg.finetune_steps // 2), progress=False,
                            backbone_lr_multiplier=cfg.backbone_lr_multiplier)
    if decoder in PEER_DECODERS:
        segm = run_peer_cell(cfg, data, decoder, train_manifest, subset_size, seed, train_cfg,
                             run_dir)
    else:
        segm = run_our_cell(cfg, data, decoder, train_manifest, subset_size, seed, train_cfg,
                            run_dir, init)
    agnostic = segm.pop("agnostic", None)
    extra = {} if agnostic is None else {"AP_agnostic": agnostic["AP"],
                                         "AP50_agnostic": agnostic["AP50"]}
    return {**cell, "AP": segm["AP"], "AP50": segm["AP50"], "AP75": segm["AP75"], **extra,
            "run": str(run_dir.relative_to(out)), "seconds": round(time.perf_counter() - t0, 1),
            "threads": torch.get_num_threads()}


def run_our_cell(cfg: StudyConfig, data: dict[str, Path], decoder: str, train_manifest: Path,
                 subset_size: int, seed: int, train_cfg: TrainConfig, run_dir: Path,
                 init: str) -> dict:
    """Fine-tune our ``decoder`` from ``init`` (resuming), then ``evaluate`` its final
    checkpoint on the val set (into ``run_dir/evaluate``); its segm metrics."""
    run_finetune(
        FinetuneConfig(
            train_data=train_manifest,
            val_data=data["val"], init=init, out=run_dir,
            model=model_section(cfg, decoder, "finetune"),
            data=data_section(cfg, seed, max_batch=subset_size),
            num_points=None, stage_assignment=cfg.stage_assignment, train=train_cfg, resume=True,
        ),
        progress=False,
    )
    report = run_evaluate(
        EvaluateConfig(checkpoint=run_dir, data=data["val"],
                       out=run_dir / "evaluate", short_side=cfg.eval_short_side,
                       max_long_side=cfg.max_long_side, batch_size=4),
        progress=False,
    )
    segm = dict(report["segm"])
    if cfg.data == "real":  # class-agnostic AP too: 80 categories on a few hundred photos
        from pipeline.evaluation import class_agnostic_segm

        predictions = json.loads((run_dir / "evaluate" / "predictions.json").read_text())
        segm["agnostic"] = class_agnostic_segm(load_manifest(data["val"]).coco, predictions)
    return segm


def run_peer_cell(cfg: StudyConfig, data: dict[str, Path], decoder: str, train_manifest: Path,
                  subset_size: int, seed: int, train_cfg: TrainConfig, run_dir: Path) -> dict:
    """Train the peer ``decoder`` from scratch on the cell's subset (resuming), evaluate it on
    the val set; its segm metrics, also written to ``run_dir/evaluate/metrics.json``."""
    import torch

    from experiments.peer_models import score_peer, train_peer
    from pipeline.coco_dataset import category_ids as sorted_category_ids
    from pipeline.manifest import load_manifest

    train_set, val_set = load_manifest(train_manifest), load_manifest(data["val"])
    category_ids = sorted_category_ids(val_set.categories)
    section = data_section(cfg, seed, max_batch=subset_size)
    device = torch.device("cpu")
    model = train_peer(decoder, train_set, category_ids, batch_size=section.batch_size,
                       augment=section.augment(), seed=seed, train_cfg=train_cfg,
                       run_dir=run_dir, device=device, depth=peer_backbone(cfg),
                       size=cfg.eval_short_side, resume=True, val_set=val_set,
                       eval_resize=section.eval_resize(),
                       backbone_checkpoint=cfg.backbone_checkpoint, width=cfg.peer_width,
                       freeze_backbone=cfg.finetune_backbone == "frozen")
    metrics = score_peer(decoder, model, val_set, category_ids, section.eval_resize(), device,
                         agnostic=cfg.data == "real")
    write_text_atomic(run_dir / "evaluate" / "metrics.json", json.dumps(metrics, indent=1))
    segm = dict(metrics["segm"])
    if "segm_agnostic" in metrics:
        segm["agnostic"] = metrics["segm_agnostic"]
    return segm


def peer_backbone(cfg: StudyConfig) -> str:
    """The Mask R-CNN peer's backbone: the preset's (tiny CNN, ResNet-18, ResNet-50), the one
    our decoders sit on."""
    from uplvp_model.config import model_config

    return model_config(cfg.model.get("preset", "tiny")).backbone


# --------------------------------------------------------------------------- report


def cell_key(record: dict) -> tuple:
    return (record["decoder"], float(record["regime"]), int(record["seed"]), record["arm"])


def read_results(out: Path) -> list[dict]:
    path = out / "results.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def summarise(out: Path, records: list[dict], ap_at_steps: tuple[int, ...] = ()) -> list[dict]:
    """One row per (decoder, regime, arm): AP/AP50/AP75 mean ± std over seeds, and the steps
    each seed needs to reach the scratch arm's final AP of the same seed (as % of its steps);
    for each step of ``ap_at_steps``, the validation AP at that step (mean ± std over the
    seeds whose curve has an evaluation there)."""
    # the target is the scratch run's last validation AP, so that both sides of the comparison
    # come from the same in-training evaluation (batching can move the final `evaluate` AP a bit)
    scratch = {}
    for r in records:
        if r["arm"] == "scratch":
            curve = ap_curve(out / r["run"] / METRICS_FILE)
            scratch[(r["decoder"], r["regime"], r["seed"])] = curve[-1][1] if curve else r["AP"]
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["decoder"], r["regime"], r["arm"]), []).append(r)
    rows = []
    for (decoder, regime, arm), rs in sorted(groups.items(), key=lambda kv: (
            kv[0][0], kv[0][1], list(ARMS).index(kv[0][2]))):
        reach = []
        for r in rs:
            target = scratch.get((decoder, regime, r["seed"]))
            curve = ap_curve(out / r["run"] / METRICS_FILE)
            if target is not None and curve:
                step = steps_to_reach(curve, target)
                reach.append("never" if step is None else f"{100 * step / curve[-1][0]:.0f}%")
        agnostic = [r["AP_agnostic"] for r in rs if r.get("AP_agnostic") is not None]
        rows.append({
            "decoder": decoder, "regime": regime, "arm": arm, "seeds": len(rs),
            "AP": mean_std([r["AP"] for r in rs]), "AP50": mean_std([r["AP50"] for r in rs]),
            "AP75": mean_std([r["AP75"] for r in rs]),
            "ap_mean": statistics.mean(r["AP"] for r in rs),
            "reach": ", ".join(reach) or "-",
            "AP_agnostic": mean_std(agnostic) if agnostic else None,
            "agnostic_mean": statistics.mean(agnostic) if agnostic else None,
            "AP50_agnostic": mean_std([r["AP50_agnostic"] for r in rs]) if agnostic else None,
            "peer_reach": peer_reach(out, records, rs),
            "ap_at": {step: ap_at_step(out, rs, step) for step in ap_at_steps},
        })
    scratch_mean = {(r["decoder"], r["regime"]): r["ap_mean"] for r in rows
                    if r["arm"] == "scratch"}
    scratch_ap = {cell_key({**r, "arm": "scratch"}): r["AP"] for r in records
                  if r["arm"] == "scratch"}
    for r in rows:
        base = scratch_mean.get((r["decoder"], r["regime"]))
        r["ratio"] = f"{r['ap_mean'] / base:.2f}x" if base else "-"
        # paired by seed: the same labeled subset and fine-tuning seed on both sides
        gains = [rec["AP"] - scratch_ap[cell_key({**rec, "arm": "scratch"})]
                 for rec in groups[(r["decoder"], r["regime"], r["arm"])]
                 if cell_key({**rec, "arm": "scratch"}) in scratch_ap]
        r["gain"] = "-" if r["arm"] == "scratch" or not gains else (
            f"{100 * statistics.mean(gains):+.1f}" + (
                f" ± {100 * statistics.stdev(gains):.1f}" if len(gains) > 1 else "")
            + f" ({sum(g > 0 for g in gains)}/{len(gains)} seeds > 0)")
    # the CNN peer's scratch mean at the same regime (the paper's claim: QEIS vs CNN)
    peer_mean = {r["regime"]: r["ap_mean"] for r in rows
                 if r["decoder"] in PEER_DECODERS and r["arm"] == "scratch"}
    peer_agnostic = {r["regime"]: r["agnostic_mean"] for r in rows
                     if r["decoder"] in PEER_DECODERS and r["arm"] == "scratch"}
    scratch_agnostic = {(r["decoder"], r["regime"]): r["agnostic_mean"] for r in rows
                        if r["arm"] == "scratch"}
    for r in rows:
        base = peer_mean.get(r["regime"])
        r["vs_peer"] = f"{r['ap_mean'] / base:.2f}x" if base else "-"
        if r["agnostic_mean"] is not None:
            base = scratch_agnostic.get((r["decoder"], r["regime"]))
            r["ratio_agnostic"] = f"{r['agnostic_mean'] / base:.2f}x" if base else "-"
            base = peer_agnostic.get(r["regime"])
            r["vs_peer_agnostic"] = f"{r['agnostic_mean'] / base:.2f}x" if base else "-"
    return rows


def ap_at_step(out: Path, group: list[dict], step: int) -> str:
    """Validation mask AP at fine-tuning ``step`` over the cells of ``group`` (mean ± std over
    the seeds with an evaluation at that step; "-" when none has one)."""
    values = []
    for r in group:
        curve = dict(ap_curve(out / r["run"] / METRICS_FILE))
        if step in curve:
            values.append(curve[step])
    if len(values) < len(group) and values:
        return f"{mean_std(values)} ({len(values)}/{len(group)} seeds)"
    return mean_std(values)


def peer_reach(out: Path, records: list[dict], group: list[dict]) -> str:
    """Per seed of ``group`` (cells of one decoder, regime and arm): the first validation step
    at which the cell's AP reaches the Mask R-CNN peer's final validation AP of the same regime
    and seed ("never" if it does not; "-" without a peer cell)."""
    finals = {}
    for r in records:
        if r["decoder"] in PEER_DECODERS and r["arm"] == "scratch":
            curve = ap_curve(out / r["run"] / METRICS_FILE)
            if curve:
                finals[(r["regime"], r["seed"])] = curve[-1][1]
    steps = []
    for r in group:
        target = finals.get((r["regime"], r["seed"]))
        curve = ap_curve(out / r["run"] / METRICS_FILE)
        if target is None or not curve:
            continue
        step = steps_to_reach(curve, target)
        steps.append("never" if step is None else str(step))
    return ", ".join(steps) or "-"


def markdown_table(rows: list[dict]) -> str:
    """The results table; with Mask R-CNN rows, a column of each row's AP over Mask R-CNN's
    scratch AP at the same regime (mean over seeds) and the step at which each seed passes
    Mask R-CNN's final AP; with class-agnostic APs (real photos), their columns too."""
    peer = any(r["decoder"] in PEER_DECODERS for r in rows)
    agnostic = any(r.get("agnostic_mean") is not None for r in rows)
    columns = ["decoder", "labeled", "arm", "seeds", "mask AP", "AP50", "AP75", "AP / scratch"]
    if peer:
        columns.append("AP / Mask R-CNN")
    if agnostic:
        columns += ["class-agnostic AP", "agnostic AP50", "agnostic / scratch"]
        if peer:
            columns.append("agnostic / Mask R-CNN")
    ap_at_steps = list(rows[0].get("ap_at", {})) if rows else []
    columns += [f"val AP at step {step}" for step in ap_at_steps]
    columns += ["AP gain over scratch, paired by seed", "steps to scratch's final AP (per seed)"]
    if peer:
        columns.append("step passing Mask R-CNN's final AP (per seed)")
    lines = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    for r in rows:
        cells = [r["decoder"], f"{format_percent(r['regime'])}%", r["arm"], str(r["seeds"]),
                 r["AP"], r["AP50"], r["AP75"], r["ratio"]]
        if peer:
            cells.append(r["vs_peer"])
        if agnostic:
            cells += [r.get("AP_agnostic") or "-", r.get("AP50_agnostic") or "-",
                      r.get("ratio_agnostic", "-")]
            if peer:
                cells.append(r.get("vs_peer_agnostic", "-"))
        cells += [r["ap_at"][step] for step in ap_at_steps]
        cells += [r["gain"], r["reach"]]
        if peer:
            cells.append(r["peer_reach"])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(out: Path, records: list[dict]) -> list[Path]:
    """One PNG per (decoder, regime): mean val mask AP vs fine-tuning step for each arm, with
    the peer decoders' (Mask R-CNN's) scratch curves of the regime drawn dashed on our
    decoders' plots (a peer gets a plot of its own only at a regime none of ours ran)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    paths = []
    keys = sorted({(r["decoder"], r["regime"]) for r in records})
    ours = {regime for decoder, regime in keys if decoder not in PEER_DECODERS}
    keys = [(d, g) for d, g in keys if d not in PEER_DECODERS or g not in ours]
    for decoder, regime in keys:
        figure = Figure(figsize=(8.5, 4.5))
        FigureCanvasAgg(figure)
        ax = figure.add_subplot()
        lines = [(decoder, arm, arm) for arm in ARMS]
        if decoder not in PEER_DECODERS:
            lines += [(peer, "scratch", f"{peer} scratch") for peer in PEER_DECODERS]
        for line_decoder, arm, name in lines:
            curves = [ap_curve(out / r["run"] / METRICS_FILE) for r in records
                      if (r["decoder"], r["regime"], r["arm"]) == (line_decoder, regime, arm)]
            curves = [c for c in curves if c]
            if not curves:
                continue
            length = min(len(c) for c in curves)
            steps = [s for s, _ in curves[0][:length]]
            mean = [100 * statistics.mean(c[i][1] for c in curves) for i in range(length)]
            peer_line = line_decoder != decoder
            line, = ax.plot(steps, mean, label=f"{name} (n={len(curves)})",
                            linewidth=2 if arm in ("scratch", "full") else 1,
                            **({"linestyle": "--", "color": "black"} if peer_line else {}))
            if len(curves) > 1:  # ± one standard deviation over seeds
                std = [100 * statistics.stdev(c[i][1] for c in curves) for i in range(length)]
                ax.fill_between(steps, [m - d for m, d in zip(mean, std)],
                                [m + d for m, d in zip(mean, std)], color=line.get_color(),
                                alpha=0.15, linewidth=0)
        ax.set_title(f"{decoder}, {format_percent(regime)}% labels: val mask AP "
                     "(mean ± std of seeds)")
        ax.set_xlabel("fine-tuning step")
        ax.set_ylabel("mask AP (%)")
        ax.grid(alpha=0.3)
        # outside the axes: inside, it covered the Mask R-CNN curve (steps 150-350, knet 5 %)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        path = out / "plots" / f"ap_{decoder}_{format_percent(regime)}pct.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=100, bbox_inches="tight")
        paths.append(path)
    return paths


def report(out: Path, results_md: Path | None, note: str = "",
           ap_at_steps: tuple[int, ...] = ()) -> str:
    records = read_results(out)
    rows = summarise(out, records, ap_at_steps)
    table = markdown_table(rows)
    plots = plot_curves(out, records)
    text = table + "\nPlots: " + ", ".join(str(p) for p in plots) + "\n"
    print(text)
    if results_md is not None:
        import shutil

        plot_dir = results_md.parent / f"{results_md.stem}_plots"  # plots travel with the report
        plot_dir.mkdir(parents=True, exist_ok=True)
        for path in plots:
            shutil.copyfile(path, plot_dir / path.name)
        text = table + "\nPlots: " + ", ".join(f"{plot_dir.name}/{p.name}" for p in plots) + "\n"
        cfg = (out / "study.yaml").read_text() if (out / "study.yaml").is_file() else ""
        seconds = sum(r.get("seconds", 0) for r in records)
        write_text_atomic(results_md, (
            "# Low-data study results\n\n"
            "Generated by `experiments/low_data_study.py --report-only --results-md "
            f"{results_md}` from `{out}/results.jsonl` ({len(records)} cells, "
            f"{seconds / 3600:.1f} h of cell time).\n\n"
            + (f"{note}\n\n" if note else "")
            + f"{text}\nConfig:\n\n```yaml\n{cfg}```\n"
        ))
    return text


def compose_note(note: str, note_file: Path | list[Path] | None) -> str:
    """The text put above the report's table: ``note``, then the markdown of each note file in
    order (e.g. the study at one look, then the reading of the phases below)."""
    files = [] if note_file is None else [note_file] if isinstance(note_file, Path) else note_file
    for path in files:
        if not path.is_file():
            raise InputError(f"--note-file {path} does not exist")
    parts = [note.strip(), *(path.read_text().strip() for path in files)]
    return "\n\n".join(part for part in parts if part)


def export(out: Path, dest: Path) -> list[Path]:
    """Copy what the report needs (``study.yaml``, ``results.jsonl``, each recorded run's
    ``metrics.jsonl`` and ``evaluate/metrics.json``) to ``dest``, a small folder to keep with
    the results: ``--report-only --out DEST`` re-plots from it, and copying it to a new
    ``--out`` lets a later machine resume the study (finished cells are skipped; pre-training
    runs are redone when a new cell needs them)."""
    import shutil

    files = [Path("study.yaml"), Path("results.jsonl")]
    for record in read_results(out):
        files += [Path(record["run"]) / METRICS_FILE, Path(record["run"]) / "evaluate" / "metrics.json"]
    copied = []
    for relative in files:
        if (out / relative).is_file():
            (dest / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(out / relative, dest / relative)
            copied.append(dest / relative)
    return copied


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--config", type=Path, help="YAML of StudyConfig fields")
    parser.add_argument("--report-only", action="store_true", help="tables/plots only")
    parser.add_argument("--results-md", type=Path, help="also write this markdown report")
    parser.add_argument("--note", default="", help="a paragraph put above the table")
    parser.add_argument("--note-file", type=Path, action="append", help="markdown put above "
                        "the table (after --note), in order; repeatable: the study at one look "
                        "(results_overview.md), then the reading (study_reading.md)")
    parser.add_argument("--export", type=Path, help="copy the results and per-run metrics "
                        "to this folder (to keep; report and resume from it)")
    parser.add_argument("--ap-at-step", type=int, action="append", default=[], metavar="STEP",
                        help="add a column of the validation mask AP at this fine-tuning step "
                        "(mean ± std over seeds); repeatable")
    parser.add_argument("--threads", type=int, help="torch CPU threads of this process "
                        "(run one process per core with --threads 1 to share an --out)")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    values = yaml.safe_load(args.config.read_text()) if args.config else {}
    cfg = StudyConfig(**(values or {}))
    unknown = sorted(set(cfg.arms) - set(ARMS))
    if unknown:
        raise SystemExit(f"error: unknown arm(s) {unknown}; choose from {list(ARMS)}")
    unknown = sorted(set(cfg.decoders) - set(DECODERS))
    if unknown:
        raise SystemExit(f"error: unknown decoder(s) {unknown}; choose from {list(DECODERS)}")
    try:
        note = compose_note(args.note, args.note_file)  # a bad --note-file fails before the study
        if not args.report_only:
            run_study(cfg, args.out)
    except InputError as err:
        raise SystemExit(f"error: {err}") from None
    if any(step < 0 for step in args.ap_at_step):
        raise SystemExit("error: --ap-at-step must be a step >= 0")
    report(args.out, args.results_md, note, tuple(args.ap_at_step))
    if args.export:
        print(f"exported {len(export(args.out, args.export))} files to {args.export}")


if __name__ == "__main__":
    main()

"""`uplvp demo`: the whole pipeline on the embedded synthetic data, one command.

synth data -> propose (``proposer``: the ``clip`` proposer on the CLIP the package ships, or the
weight-free ``classical`` one) -> pretrain (prompt injection, the text loss) -> finetune from the
pre-trained checkpoint and from scratch with identical budgets -> evaluate both -> side-by-side
table, AP-curve PNG and mask overlays. Every step resumes, so rerunning the demo continues it.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal

import pandas as pd
from rich.console import Console
from rich.table import Table

from pipeline.atomic import write_json_atomic
from pipeline.proposal_quality import quality_against
from pipeline.run_record import now_iso, write_run_record
from pipeline.shard_dataset import MaskFilter
from pipeline.synth import UNLABELED_TRUTH_FILE
from stages.data import SynthConfig, run_check, run_synth
from stages.evaluate import EvaluateConfig, run_evaluate
from stages.finetune import FinetuneConfig, run_finetune
from stages.predict import PredictConfig, run_predict
from stages.pretrain import LossSection, PretrainConfig, PromptSection, run_pretrain
from stages.propose import ProposeConfig, run_propose
from pipeline.engine.metrics import METRICS_FILE, ap_curve
from pipeline.evaluation.curves import compare_arms, plot_ap_curves
from pipeline.engine import TrainConfig
from stages.training_setup import DataSection, ModelSection

console = Console(stderr=True)

ARMS = ("pretrained", "scratch")
AP_KEY = "val/segm_AP"


class DemoConfig(SynthConfig):
    """The synthetic data options plus the budgets of each stage (small enough for 2 cores).

    The method itself: pseudo masks and prompt embeddings from the CLIP the package ships
    (``uplvp-synth-vit``) through the ``clip`` proposer, pre-training with prompt injection and
    the CLIP text loss, then the same fine-tuning from the pre-trained kernels and from scratch.
    200 fine-tuning steps (~27 epochs of the 60 labeled images): the pre-trained arm has
    converged by then and later steps only let scratch catch up (docs/demo.md has the curves).
    ``--proposer classical`` runs the weight-free proposer instead (no CLIP, no text loss).
    """

    out: Path = Path("demo_run")
    propose_workers: int = 2
    pretrain_steps: int = 1000
    finetune_steps: int = 200
    eval_every: int = 25
    batch_size: int = 8
    pretrain_lr: float = 1e-3
    finetune_lr: float = 5e-4
    model: ModelSection = ModelSection(
        preset="tiny", overrides={"hidden_dim": 64, "num_kernels": 20, "ffn_dim": 128}
    )
    prompt: PromptSection = PromptSection(inject=True)
    overlay_score_threshold: float = 0.25  # toy-scale models score below predict's 0.5
    # the pseudo masks: "clip" (the language-vision proposer on ``clip_model``, by default the
    # toy CLIP the package ships, read with its card's proposer options unless ``clip_options``)
    # or "classical" (weight-free OpenCV segmentation, no language model)
    proposer: Literal["clip", "classical"] = "clip"
    clip_model: str = "uplvp-synth-vit"
    clip_checkpoint: str | None = None
    clip_options: dict[str, Any] | None = None
    # the CLIP text loss in pre-training (LossSection.text); None: 1.0 with the clip proposer,
    # 0 with the classical one (its shards hold no CLIP embeddings)
    text_weight: float | None = None

    def resolved_text_weight(self) -> float:
        if self.text_weight is not None:
            return self.text_weight
        return 1.0 if self.proposer == "clip" else 0.0


def run_demo(cfg: DemoConfig, progress: bool = True) -> dict:
    started = now_iso()
    t0 = time.perf_counter()
    out = Path(cfg.out)
    data_dir = out / "data"
    timings: dict[str, float] = {}

    def step(name: str, title: str | None = None):
        console.rule(f"[bold]{len(timings) + 1}. {title or name}")
        timings[name] = time.perf_counter()

    def done(name: str):
        timings[name] = round(time.perf_counter() - timings[name], 1)

    step("synthetic data")
    synth_fields = {name: getattr(cfg, name) for name in SynthConfig.model_fields}
    run_synth(SynthConfig(**{**synth_fields, "out": data_dir}), progress=progress)
    for split in ("unlabeled", "train", "val"):
        run_check(data_dir / f"{split}.yaml")
    done("synthetic data")

    step("propose", f"propose ({describe_proposer(cfg)})")
    run_propose(propose_config(cfg, data_dir, out), progress=progress)
    quality = pseudo_mask_quality(out / "propose", data_dir)
    console.print(format_quality(quality, labelled=cfg.proposer == "clip"))
    done("propose")

    data = demo_data_section(cfg)
    text_weight = cfg.resolved_text_weight()
    step("pretrain", f"pretrain ({describe_pretrain(cfg.prompt.inject, text_weight)})")
    run_pretrain(pretrain_config(cfg, out, data, text_weight, progress), progress=progress)
    done("pretrain")

    reports = {}
    for arm in ARMS:
        name = f"finetune ({arm})"
        step(name)
        reports[arm] = finetune_arm(cfg, arm, out, data, progress)
        done(name)

    curves = {arm: ap_curve(out / f"finetune_{arm}" / METRICS_FILE) for arm in ARMS}
    summary = {"seed": cfg.seed, **compare_arms(reports, curves)}
    plot_path = plot_ap_curves(curves, out / "ap_curves.png")
    print_comparison(summary)
    summary["pseudo_masks"] = quality
    summary["timings_seconds"] = timings
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    console.print(format_timings(timings, summary["seconds"]))
    write_json_atomic(out / "demo_summary.json", summary, indent=2)
    write_run_record(out, stage="demo", config=cfg.resolved(), config_hash=cfg.config_hash(),
                     inputs={}, counts=summary, started_at=started)
    source = ("a toy CLIP trained on synthetic scenes" if cfg.proposer == "clip"
              else "the weight-free classical proposer")
    console.print(
        f"demo finished in {summary['seconds']} s. Table: {out / 'demo_summary.json'}; AP "
        f"curves: {plot_path}; overlays (score > {cfg.overlay_score_threshold}): "
        f"{out}/predict_*/overlays/. The pseudo masks come from {source} on synthetic data: "
        "this demo shows the method and the effect of pre-training at toy scale, not what a "
        "real CLIP gives on real photos."
    )
    return summary


def pretrain_config(cfg: DemoConfig, out: Path, data: DataSection, text_weight: float,
                    progress: bool) -> PretrainConfig:
    """The demo's pre-training: UPLVP on the proposal shards, ``cfg.pretrain_steps`` steps."""
    return PretrainConfig(
        shards=out / "propose", out=out / "pretrain", model=cfg.model, data=data,
        prompt=cfg.prompt, loss=LossSection(num_points=None, text=text_weight),
        train=TrainConfig(max_steps=cfg.pretrain_steps, lr=cfg.pretrain_lr,
                          warmup_steps=min(100, cfg.pretrain_steps // 10),
                          checkpoint_every=max(1, cfg.pretrain_steps // 3),
                          log_every=50, seed=cfg.seed, progress=progress),
        resume=True,
    )


def finetune_arm(cfg: DemoConfig, arm: str, out: Path, data: DataSection, progress: bool
                 ) -> dict:
    """Fine-tune one arm (from the pre-trained kernels or from scratch: only ``init`` and the
    folders differ), evaluate its final checkpoint on val, draw its overlays; returns the
    evaluation report."""
    data_dir, run_dir = out / "data", out / f"finetune_{arm}"
    run_finetune(
        FinetuneConfig(
            train_data=data_dir / "train.yaml", val_data=data_dir / "val.yaml",
            init=str(out / "pretrain") if arm == "pretrained" else "none",
            out=run_dir, model=cfg.model, data=data, num_points=None,
            train=TrainConfig(max_steps=cfg.finetune_steps, lr=cfg.finetune_lr,
                              warmup_steps=min(50, cfg.finetune_steps // 10),
                              eval_every=cfg.eval_every,
                              checkpoint_every=max(1, cfg.finetune_steps // 2),
                              log_every=50, seed=cfg.seed, progress=progress),
            resume=True,
        ),
        progress=progress,
    )
    report = run_evaluate(
        EvaluateConfig(checkpoint=run_dir, data=data_dir / "val.yaml",
                       out=out / f"evaluate_{arm}", short_side=data.eval_short_side,
                       max_long_side=data.max_long_side, batch_size=4),
        progress=progress,
    )
    run_predict(
        PredictConfig(checkpoint=run_dir, images=data_dir / "val.yaml",
                      out=out / f"predict_{arm}", short_side=data.eval_short_side,
                      max_long_side=data.max_long_side,
                      score_threshold=cfg.overlay_score_threshold, batch_size=4,
                      overlays=True),
        progress=progress,
    )
    return report


def describe_proposer(cfg: DemoConfig) -> str:
    if cfg.proposer == "classical":
        return "classical proposer: weight-free, no CLIP"
    if cfg.clip_checkpoint is None:  # short: a rule's title is cut at the log's 80 columns
        return f"clip proposer: shipped CLIP {cfg.clip_model}"
    return f"clip proposer: CLIP {cfg.clip_model}, weights {Path(cfg.clip_checkpoint).name}"


def describe_pretrain(inject: bool, text_weight: float) -> str:
    return (f"UPLVP: prompt injection {'on' if inject else 'off'}, text loss weight "
            f"{text_weight:g}")


def clip_options(cfg: DemoConfig) -> dict[str, Any]:
    """The clip proposer's options: ``cfg.clip_options``, else the shipped model's card's."""
    if cfg.clip_options is not None:
        return dict(cfg.clip_options)
    from uplvp_model.proposal.shipped import is_shipped, shipped_model

    if cfg.clip_checkpoint is None and is_shipped(cfg.clip_model):
        return dict(shipped_model(cfg.clip_model, verify=False).card.get("proposer_options", {}))
    return {}


def propose_config(cfg: DemoConfig, data_dir: Path, out: Path) -> ProposeConfig:
    """The propose stage of the demo; the clip proposer names the data's categories."""
    fields: dict[str, Any] = {}
    if cfg.proposer == "clip":
        categories = json.loads((data_dir / "val" / "annotations.json").read_text())["categories"]
        vocabulary = out / "vocabulary.txt"
        vocabulary.parent.mkdir(parents=True, exist_ok=True)
        vocabulary.write_text("".join(f"{c['name']}\n" for c in categories), encoding="utf-8")
        fields = {"clip_model": cfg.clip_model, "clip_checkpoint": cfg.clip_checkpoint,
                  "vocabulary": vocabulary, "options": clip_options(cfg), "device": "cpu"}
    return ProposeConfig(images=data_dir / "unlabeled.yaml", out=out / "propose",
                         proposer=cfg.proposer, shard_size=50, num_workers=cfg.propose_workers,
                         **fields)


def pseudo_mask_quality(propose_dir: Path, data_dir: Path) -> dict[str, float]:
    """The demo's pseudo masks against what the generator drew in the unlabeled images (IoU 0.5;
    "kept": the masks pre-training uses, ``MaskFilter()``)."""
    coco = json.loads((data_dir / "unlabeled" / UNLABELED_TRUTH_FILE).read_text())
    return quality_against(pd.read_parquet(propose_dir / "masks"),
                           pd.read_parquet(propose_dir / "images"), coco, MaskFilter())


def format_quality(q: dict[str, float], labelled: bool = True) -> str:
    """One line; ``labelled`` False: the proposer names no category (label accuracy n/a)."""
    def pct(x: float) -> str:
        return "n/a" if x != x else f"{100 * x:.1f} %"  # NaN: nothing to score
    label = pct(q["kept_label_accuracy"]) if labelled else "n/a (no category names)"
    return (f"pseudo masks vs the generator's {q['instances']} objects in {q['images']} unlabeled "
            f"images (IoU >= 0.5): {q['masks_per_image']:.2f} masks/image, recall "
            f"{pct(q['recall'])}, precision {pct(q['precision'])}; kept for pre-training "
            f"{q['kept_masks_per_image']:.2f}/image, recall {pct(q['kept_recall'])}, precision "
            f"{pct(q['kept_precision'])}, label accuracy {label}")


def format_timings(timings: dict[str, float], total: float) -> str:
    """One line: each stage's seconds in run order, then the total (the demo's wall time,
    evaluation and predictions included in their arm's stage)."""
    parts = [f"{name.split(' (')[0] if not name.startswith('finetune') else name} {seconds:.1f} s"
             for name, seconds in timings.items()]
    return f"seconds per stage: {', '.join(parts)}; total {total:.1f} s"


def demo_data_section(cfg: DemoConfig) -> DataSection:
    """Batching and sizes for both training stages: scale jitter of the short side over
    0.875-1.125x ``image_size``, evaluation at ``image_size``, long side capped at 1.5x."""
    size = cfg.image_size
    return DataSection(batch_size=cfg.batch_size, short_side=(round(0.875 * size),
                                                              round(1.125 * size)),
                       max_long_side=round(1.5 * size), eval_short_side=size, num_workers=0,
                       seed=cfg.seed)


def print_comparison(summary: dict) -> None:
    table = Table(title="UPLVP demo: fine-tuning from pre-trained kernels vs from scratch "
                        f"(val mask AP, %, seed {summary['seed']})")
    for col in ("arm", "AP", "AP50", "AP75", "steps to reach scratch's final AP"):
        table.add_column(col, justify="right")
    for arm, row in summary["arms"].items():
        reach = row["steps_to_scratch_final_AP"]
        table.add_row(arm, *(f"{100 * (row[k] or 0):.1f}" for k in ("AP", "AP50", "AP75")),
                      f"{reach} of {row['final_step']}" if reach is not None else "never")
    Console().print(table)
    ratio = summary["AP_ratio_pretrained_over_scratch"]
    if ratio is not None:
        Console().print(f"AP ratio pretrained / scratch: {ratio:.2f}")

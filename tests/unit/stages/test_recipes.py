"""The COCO recipes (stages/recipes/coco/) and their launch scripts (stages/recipes/launch/),
checked without COCO and without a GPU (docs/recipes.md).

- Every recipe YAML loads with its stage's own config class (``load_config``, as
  ``--config FILE`` does), the files chain into each other (propose -> pretrain -> finetune ->
  evaluate, split -> finetune), the schedules are the reference's epochs in steps, and the
  manifests follow the schema.
- Dry runs on CPU, with each recipe copied and only the data-dependent fields replaced: data
  paths -> a tiny synthetic set, ``out`` -> tmp, ``train.max_steps`` 1, image sizes 64 px and
  batch 1 with no loader workers, ``device`` cpu, the placeholder backbone checkpoint -> None
  (the backbone stays frozen: ``freeze_backbone`` and ``norm: frozen`` are kept), and for
  propose the CLIP: the toy CLIP the package ships with its card's options and the synthetic
  class names instead of ViT-B-16 weights. Propose -> split -> pretrain (both decoders, R50,
  one step) -> finetune (both decoders x 1/5/10 %, init from that pre-training, one step and
  a validation) -> evaluate.
- The launch scripts parse (``bash -n``, shellcheck where installed), run as written against
  fake ``uplvp`` / ``torchrun`` / ``sbatch`` commands that record their arguments, use only
  options the CLI has, and run exactly the commands docs/recipes.md shows.
"""
from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

from pipeline.manifest import ManifestSpec
from pipeline.splits import split_file_stem, subset_size
from stages.config import StageConfig, load_config
from stages.data import SplitConfig
from stages.evaluate import EvaluateConfig
from stages.finetune import FinetuneConfig
from stages.pretrain import PretrainConfig
from stages.propose import ProposeConfig
from tests.helpers import REPO

RECIPES = REPO / "stages" / "recipes"
COCO = RECIPES / "coco"
LAUNCH = RECIPES / "launch"
DOC = REPO / "docs" / "recipes.md"

DECODERS = ("knet", "mask2former")
PERCENTS = (1, 5, 10)
COCO_TRAIN2017_IMAGES = 118_287
GLOBAL_BATCH = 16
CLIP_PLACEHOLDER = "weights/open_clip_ViT-B-16.bin"
BACKBONE_PLACEHOLDER = "weights/moco_v2_r50.pth"

RECIPE_FILES = (
    ["propose_clip.yaml", "split.yaml"]
    + [f"pretrain_{d}.yaml" for d in DECODERS]
    + [f"{stage}_{d}_{p}pct.yaml" for stage in ("finetune", "evaluate") for d in DECODERS
       for p in PERCENTS]
)
CLASSES: dict[str, type[StageConfig]] = {
    "propose": ProposeConfig, "split": SplitConfig, "pretrain": PretrainConfig,
    "finetune": FinetuneConfig, "evaluate": EvaluateConfig,
}


def stage_class(name: str) -> type[StageConfig]:
    return CLASSES[name.split("_")[0].removesuffix(".yaml")]


def recipe(name: str) -> StageConfig:
    """The recipe as ``uplvp ... --config stages/recipes/coco/NAME`` reads it."""
    return load_config(stage_class(name), COCO / name, {})


def dry_run_config(name: str, overrides: dict) -> StageConfig:
    """The recipe's YAML with ``overrides`` (dotted keys; None values too) validated by its
    stage's class: the recipe copied with only those fields replaced."""
    values = yaml.safe_load((COCO / name).read_text())
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = values
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return stage_class(name).model_validate(values)


def changed_fields(a: dict, b: dict, prefix: str = "") -> set[str]:
    """Dotted keys whose values differ between two resolved configs."""
    changed = set()
    for key in set(a) | set(b):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            changed |= changed_fields(x, y, f"{prefix}{key}.")
        elif x != y:
            changed.add(f"{prefix}{key}")
    return changed


# --------------------------------------------------------------------------- the configs


def test_the_recipe_folder_holds_exactly_the_documented_files():
    assert sorted(p.name for p in COCO.glob("*.yaml")) == sorted(RECIPE_FILES)
    assert sorted(p.name for p in (COCO / "manifests").glob("*.yaml")) == [
        "coco_train2017.yaml", "coco_unlabeled_train2017.yaml", "coco_val2017.yaml"]


@pytest.mark.parametrize("name", RECIPE_FILES)
def test_each_recipe_loads_with_its_stage_config(name):
    cfg = recipe(name)
    if isinstance(cfg, (PretrainConfig, FinetuneConfig)):
        model = cfg.model.build_config(num_classes=80)  # every model field resolves
        assert model.backbone == "resnet50" and model.backbone_norm == "frozen"
        assert cfg.data.augment().short_side == (800, 800)
        assert cfg.data.augment().max_long_side == 1333


@pytest.mark.parametrize("path", sorted((COCO / "manifests").glob("*.yaml")), ids=lambda p: p.name)
def test_recipe_manifests_follow_the_schema_and_the_layout(path):
    spec = ManifestSpec.model_validate(yaml.safe_load(path.read_text()))
    assert spec.images.root.startswith("../datasets/coco/")
    assert spec.annotations is None or spec.annotations.startswith("../datasets/coco/annotations/")


def test_the_recipes_chain_into_each_other():
    propose, split = recipe("propose_clip.yaml"), recipe("split.yaml")
    manifests = {f"manifests/{p.name}" for p in (COCO / "manifests").glob("*.yaml")}
    assert str(propose.images) in manifests and str(split.manifest) in manifests
    train_manifest = yaml.safe_load((COCO / split.manifest).read_text())
    annotations = Path(train_manifest["annotations"])
    assert split.percent == [1.0, 5.0, 10.0] and len(split.seed) == 1
    outs = [str(propose.out)]
    for decoder in DECODERS:
        pretrain = recipe(f"pretrain_{decoder}.yaml")
        assert pretrain.shards == propose.out
        outs.append(str(pretrain.out))
        for pct in PERCENTS:
            finetune = recipe(f"finetune_{decoder}_{pct}pct.yaml")
            evaluate = recipe(f"evaluate_{decoder}_{pct}pct.yaml")
            stem = split_file_stem(annotations, split.seed[0], pct)  # what `data split` writes
            assert finetune.train_data == split.out / f"{stem}.yaml"
            assert str(finetune.val_data) in manifests and evaluate.data == finetune.val_data
            assert finetune.init == str(pretrain.out)
            assert evaluate.checkpoint == finetune.out
            outs += [str(finetune.out), str(evaluate.out)]
            # the fine-tuned model is the pre-trained one; only where its weights come from
            # and whether the backbone trains differ
            assert changed_fields(pretrain.model.model_dump(), finetune.model.model_dump()) == {
                "backbone_checkpoint", "freeze_backbone"}
            assert finetune.model.backbone_checkpoint is None
            assert finetune.model.freeze_backbone is False
            assert finetune.stage_assignment == pretrain.loss.stage_assignment
    assert len(outs) == len(set(outs)) and all(o.startswith("runs/coco/") for o in outs)


def test_placeholders_are_marked_and_shared():
    propose = recipe("propose_clip.yaml")
    assert propose.proposer == "clip" and propose.clip_model == "ViT-B-16"
    assert propose.clip_checkpoint == CLIP_PLACEHOLDER
    assert "PLACEHOLDER" in (COCO / "propose_clip.yaml").read_text()
    for decoder in DECODERS:
        assert recipe(f"pretrain_{decoder}.yaml").model.backbone_checkpoint == BACKBONE_PLACEHOLDER
        assert "PLACEHOLDER" in (COCO / f"pretrain_{decoder}.yaml").read_text()
        for pct in PERCENTS:  # the from-scratch baseline line names the same file
            assert BACKBONE_PLACEHOLDER in (COCO / f"finetune_{decoder}_{pct}pct.yaml").read_text()


@pytest.mark.parametrize("decoder", DECODERS)
def test_pretraining_is_the_reference_12_epochs_with_a_frozen_backbone(decoder):
    cfg = recipe(f"pretrain_{decoder}.yaml")
    per_epoch = COCO_TRAIN2017_IMAGES // GLOBAL_BATCH  # the loader drops the last batch
    assert per_epoch == 7392
    t = cfg.train
    assert (t.max_steps, t.lr_steps) == (12 * per_epoch, [8 * per_epoch, 11 * per_epoch])
    assert (t.optimizer, t.lr, t.weight_decay, t.grad_clip) == ("adamw", 1e-4, 0.05, 1.0)
    assert (t.schedule, t.gamma, t.warmup_steps, t.accumulation_steps) == ("step", 0.1, 1000, 1)
    assert cfg.data.batch_size == GLOBAL_BATCH and cfg.model.freeze_backbone is True
    assert cfg.model.preset == "base" and cfg.model.decoder == decoder
    assert (cfg.masks.min_score, cfg.masks.min_area, cfg.masks.max_masks) == (0.5, 32, 20)
    assert cfg.prompt.inject and cfg.prompt.use_embedding and cfg.loss.text > 0


@pytest.mark.parametrize("decoder,pct", itertools.product(DECODERS, PERCENTS))
def test_finetuning_is_48_epochs_of_its_subset_with_the_backbone_at_a_quarter(decoder, pct):
    cfg = recipe(f"finetune_{decoder}_{pct}pct.yaml")
    per_epoch = subset_size(COCO_TRAIN2017_IMAGES, pct) // GLOBAL_BATCH
    assert per_epoch == {1: 73, 5: 369, 10: 739}[pct]
    t = cfg.train
    assert (t.max_steps, t.lr_steps) == (48 * per_epoch, [22 * per_epoch, 34 * per_epoch])
    assert (t.eval_every, t.checkpoint_every) == (6 * per_epoch, 3 * per_epoch)
    assert (t.optimizer, t.lr, t.weight_decay, t.backbone_lr_multiplier) == (
        "adamw", 1e-4, 0.05, 0.25)
    assert (t.schedule, t.warmup_steps) == ("step", 100) and cfg.data.batch_size == GLOBAL_BATCH
    evaluate = recipe(f"evaluate_{decoder}_{pct}pct.yaml")
    assert (evaluate.short_side, evaluate.max_long_side) == (800, 1333)


# --------------------------------------------------------------------------- dry runs


SMALL_DATA = {"data.batch_size": 1, "data.short_side": [64, 64], "data.max_long_side": 96,
              "data.eval_short_side": 64, "data.num_workers": 0, "train.max_steps": 1,
              "device": "cpu"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Synthetic images (6 unlabeled, 20 labeled train, 2 val, 64 px) and the propose and
    split recipes run on them: what the pretrain and finetune dry runs read."""
    from pipeline.synth import write_synth_dataset
    from stages.data import run_split
    from stages.propose import run_propose
    from uplvp_model.proposal.shipped import shipped_model

    root = tmp_path_factory.mktemp("recipes")
    summary = write_synth_dataset(root / "data", seed=0, num_unlabeled=6, num_train=20,
                                  num_val=2, image_size=64, progress=False)
    (root / "vocabulary.txt").write_text("".join(f"{n}\n" for n in summary["categories"]))
    card = shipped_model("uplvp-synth-vit", verify=False).card
    propose = dry_run_config("propose_clip.yaml", {
        "images": str(root / "data" / "unlabeled.yaml"), "out": str(root / "propose"),
        "clip_model": "uplvp-synth-vit", "clip_checkpoint": None,
        "vocabulary": str(root / "vocabulary.txt"), "options": card["proposer_options"],
        "device": "cpu"})
    assert run_propose(propose, progress=False) == 0
    assert (root / "propose" / "text_embeddings.pt").is_file()
    split = dry_run_config("split.yaml", {"manifest": str(root / "data" / "train.yaml"),
                                          "out": str(root / "splits")})
    written = run_split(split)
    splits = {pct: root / "splits" / f"annotations.1@{pct}.yaml" for pct in PERCENTS}
    assert all(path in written for path in splits.values())
    return {"root": root, "splits": splits, "pretrained": {}}


def pretrained(world, decoder: str) -> Path:
    """The pretrain recipe of ``decoder``, one step on the synthetic shards (once per module)."""
    from stages.pretrain import run_pretrain
    from uplvp_model.checkpoint import read_checkpoint

    if decoder in world["pretrained"]:
        return world["pretrained"][decoder]
    name = f"pretrain_{decoder}.yaml"
    out = world["root"] / f"pretrain_{decoder}"
    overrides = {"shards": str(world["root"] / "propose"), "out": str(out),
                 "model.backbone_checkpoint": None, **SMALL_DATA}
    cfg = dry_run_config(name, overrides)
    assert changed_fields(recipe(name).resolved(), cfg.resolved()) <= set(overrides)
    summary = run_pretrain(cfg, progress=False)
    assert summary["step"] == 1
    checkpoint = read_checkpoint(out / "checkpoints" / "step-0000001.pt")
    model_cfg = checkpoint["model_config"]
    assert model_cfg["backbone"] == "resnet50" and model_cfg["decoder"] == decoder
    assert model_cfg["freeze_backbone"] is True and model_cfg["backbone_norm"] == "frozen"
    # backbone_lr_multiplier 1 (nothing to scale: the backbone is frozen): one group
    assert len(checkpoint["optimizer"]["param_groups"]) == 1
    world["pretrained"][decoder] = out
    return out


@pytest.mark.parametrize("decoder", DECODERS)
def test_pretrain_recipe_trains_one_step(world, decoder):
    record = json.loads((pretrained(world, decoder) / "stage.json").read_text())
    assert record["config"]["loss"]["text"] == recipe(f"pretrain_{decoder}.yaml").loss.text
    assert record["inputs"]["proposal_weights"]["kind"] == "shipped"


@pytest.mark.parametrize("decoder,pct", itertools.product(DECODERS, PERCENTS))
def test_finetune_and_evaluate_recipes_run_from_the_pretrained_run(world, decoder, pct):
    from stages.evaluate import run_evaluate
    from stages.finetune import run_finetune
    from uplvp_model.checkpoint import read_checkpoint

    root = world["root"]
    name = f"finetune_{decoder}_{pct}pct.yaml"
    out = root / f"finetune_{decoder}_{pct}pct"
    overrides = {"train_data": str(world["splits"][pct]),
                 "val_data": str(root / "data" / "val.yaml"),
                 "init": str(pretrained(world, decoder)), "out": str(out), **SMALL_DATA}
    cfg = dry_run_config(name, overrides)
    assert changed_fields(recipe(name).resolved(), cfg.resolved()) <= set(overrides)
    summary = run_finetune(cfg, progress=False)
    assert summary["step"] == 1 and summary["val/segm_AP"] is not None
    init = summary["init"]  # strict init: everything fits but the re-initialised class head
    assert init["loaded"] > 0 and init["skipped"] and all("class" in k for k in init["skipped"])
    checkpoint = read_checkpoint(out / "checkpoints" / "step-0000001.pt")
    assert checkpoint["model_config"]["freeze_backbone"] is False
    groups = checkpoint["optimizer"]["param_groups"]  # the rest at lr, the backbone at 0.25 lr
    assert len(groups) == 2
    assert groups[1]["initial_lr"] == pytest.approx(0.25 * groups[0]["initial_lr"])

    eval_name = f"evaluate_{decoder}_{pct}pct.yaml"
    eval_overrides = {"checkpoint": str(out), "data": str(root / "data" / "val.yaml"),
                      "out": str(root / f"eval_{decoder}_{pct}pct"), "short_side": 64,
                      "max_long_side": 96, "num_workers": 0, "device": "cpu"}
    evaluate = dry_run_config(eval_name, eval_overrides)
    assert changed_fields(recipe(eval_name).resolved(), evaluate.resolved()) <= set(eval_overrides)
    report = run_evaluate(evaluate, progress=False)
    assert report["step"] == 1 and "AP" in report["segm"]
    shutil.rmtree(out)  # R50 checkpoints with optimizer state: ~0.4 GB a run


# --------------------------------------------------------------------------- launch scripts


SCRIPTS = sorted(LAUNCH.iterdir())
STAGE_COMMAND = re.compile(r"^(uplvp|torchrun|srun)\s")
VARIABLES = {"DECODER": DECODERS, "PCT": tuple(str(p) for p in PERCENTS)}


def logical_lines(text: str) -> list[str]:
    """Lines with backslash continuations joined, stripped."""
    return [line.strip() for line in text.replace("\\\n", " ").splitlines()]


def expand(command: str) -> set[str]:
    """``command`` with ${DECODER} / ${PCT} replaced by each of their values, whitespace
    collapsed and double quotes dropped."""
    command = " ".join(command.replace('"', "").split()).removesuffix(" &")
    names = [n for n in VARIABLES if f"${{{n}}}" in command or f"${n}" in command]
    out = set()
    for values in itertools.product(*(VARIABLES[n] for n in names)):
        text = command
        for name, value in zip(names, values):
            text = text.replace(f"${{{name}}}", value).replace(f"${name}", value)
        out.add(text)
    return out


def script_commands() -> set[str]:
    commands = set()
    for script in SCRIPTS:
        for line in logical_lines(script.read_text()):
            if STAGE_COMMAND.match(line):
                commands |= expand(line)
    return commands


def doc_commands() -> set[str]:
    """The stage commands of docs/recipes.md's bash blocks, but those of a block that opens
    with the line ``# not run by the launch scripts``."""
    commands = set()
    for block in re.findall(r"```bash\n(.*?)```", DOC.read_text(), flags=re.S):
        if block.startswith("# not run by the launch scripts"):
            continue
        for line in logical_lines(block):
            if STAGE_COMMAND.match(line):
                commands |= expand(line)
    return commands


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_launch_script_parses(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert script.read_text().startswith("#!") and os.access(script, os.X_OK)


def test_launch_scripts_pass_shellcheck():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed")
    result = subprocess.run([shellcheck, "-x", *map(str, SCRIPTS)], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout


def test_the_doc_shows_exactly_the_commands_the_scripts_run():
    docs, scripts = doc_commands(), script_commands()
    assert {  # the extraction sees the commands (variables expanded, quotes dropped)
        "uplvp stage propose --config recipes/propose_clip.yaml",
        "uplvp stage finetune --config recipes/finetune_mask2former_10pct.yaml --batch-size 2 "
        "--accumulation-steps 8 --resume",
        "torchrun --standalone --nproc-per-node 8 -m stages.cli stage pretrain --config "
        "recipes/pretrain_knet.yaml --resume",
        "uplvp stage evaluate --config $CONFIG",
    } <= scripts
    assert not docs - scripts, f"in docs/recipes.md but in no launch script: {sorted(docs - scripts)}"
    assert not scripts - docs, f"in a launch script but not in docs/recipes.md: {sorted(scripts - docs)}"


def _cli_command(tokens: list[str]):
    """The click command that ``uplvp TOKENS...`` names, and the tokens after its name."""
    import typer.main

    from stages.cli import app

    command = typer.main.get_command(app)
    while hasattr(command, "commands") and tokens and tokens[0] in command.commands:
        command, tokens = command.commands[tokens[0]], tokens[1:]
    return command, tokens


def test_script_commands_use_real_options_and_existing_recipes():
    for command in sorted(script_commands() | doc_commands()):
        tokens = shlex.split(command)
        after = tokens[tokens.index("stages.cli") + 1:] if "stages.cli" in tokens else tokens[1:]
        cli, args = _cli_command(after)
        assert not hasattr(cli, "commands"), f"{command}: not a command"
        options = {o for p in cli.params for o in (*p.opts, *p.secondary_opts)}
        unknown = [a for a in args if a.startswith("--") and a not in options]
        assert not unknown, f"{command}: unknown options {unknown}"
        config = args[args.index("--config") + 1]
        if config != "$CONFIG":  # the sbatch files take it as their argument
            assert config.startswith("recipes/") and (COCO / config.removeprefix("recipes/")).is_file(), command
    for script in SCRIPTS:  # recipes named anywhere, e.g. as sbatch arguments
        for name in re.findall(r"recipes/([\w${}]+\.yaml)", script.read_text()):
            for expanded in expand(name):
                assert (COCO / expanded).is_file(), f"{script.name}: recipes/{expanded}"


# the scripts run as written, against fake commands that log their arguments

FAKE = """#!/usr/bin/env bash
echo "{name} $*" >> "$FAKE_LOG"
{body}
"""


def fake_tools(tmp_path: Path, **bodies: str) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in bodies.items():
        path = bin_dir / name
        path.write_text(FAKE.format(name=name, body=body))
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "FAKE_LOG": str(tmp_path / "calls.log")}


def fake_coco(tmp_path: Path) -> Path:
    coco = tmp_path / "coco"
    for folder in ("train2017", "val2017", "annotations"):
        (coco / folder).mkdir(parents=True)
    for split in ("train2017", "val2017"):
        (coco / "annotations" / f"instances_{split}.json").write_text("{}")
    return coco


def run_script(name: str, work: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(LAUNCH / name), *args], cwd=work, env=env,
                          capture_output=True, text=True, timeout=60)


def test_prepare_sets_up_the_work_folder_and_checks_the_weights(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "COCO_ROOT": str(fake_coco(tmp_path))}
    result = run_script("prepare.sh", work, env)
    assert result.returncode == 2
    assert f"error: {CLIP_PLACEHOLDER} not found" in result.stderr
    assert f"error: {BACKBONE_PLACEHOLDER} not found" in result.stderr
    assert (work / "datasets" / "coco").resolve() == (tmp_path / "coco").resolve()
    assert sorted(p.name for p in (work / "recipes").iterdir()) == sorted(RECIPE_FILES)
    (work / "recipes" / "split.yaml").write_text("seed: [2]\n")  # the user's edit stays
    for placeholder in (CLIP_PLACEHOLDER, BACKBONE_PLACEHOLDER):
        (work / placeholder).write_text("weights")
    result = run_script("prepare.sh", work, env)
    assert result.returncode == 0, result.stderr
    assert (work / "recipes" / "split.yaml").read_text() == "seed: [2]\n"
    assert (work / "manifests" / "coco_val2017.yaml").read_text() == (
        COCO / "manifests" / "coco_val2017.yaml").read_text()
    assert (work / "runs" / "coco" / "slurm").is_dir()  # where the sbatch files log


def ready_work_folder(tmp_path: Path) -> Path:
    work = tmp_path / "work"
    (work / "weights").mkdir(parents=True)
    for placeholder in (CLIP_PLACEHOLDER, BACKBONE_PLACEHOLDER):
        (work / placeholder).write_text("weights")
    (work / "datasets").mkdir()
    (work / "datasets" / "coco").symlink_to(fake_coco(tmp_path))
    return work


@pytest.mark.parametrize("script", ["one_gpu.sh", "torchrun_8gpu.sh"])
def test_local_scripts_run_every_stage_in_order(tmp_path, script):
    work = ready_work_folder(tmp_path)
    env = fake_tools(tmp_path, uplvp="", torchrun="")
    result = run_script(script, work, env, "mask2former")
    assert result.returncode == 0, result.stderr
    calls = (tmp_path / "calls.log").read_text().splitlines()
    stages = [re.search(r"stage (\w+)|data (split)", c).group(1 if "stage" in c else 2) for c in calls]
    assert stages == ["propose", "pretrain", "split"] + ["finetune", "evaluate"] * 3
    configs = [c.split("--config ")[1].split()[0] for c in calls]
    assert configs == ["recipes/propose_clip.yaml", "recipes/pretrain_mask2former.yaml",
                       "recipes/split.yaml"] + [
        f"recipes/{stage}_mask2former_{p}pct.yaml" for p in PERCENTS
        for stage in ("finetune", "evaluate")]
    assert all((work / c).is_file() for c in configs)
    assert run_script(script, work, env, "maskrcnn").returncode == 2


def test_slurm_submit_chains_the_jobs(tmp_path):
    work = ready_work_folder(tmp_path)
    counter = tmp_path / "jobid"
    counter.write_text("100")
    env = fake_tools(tmp_path, uplvp="", sbatch=(
        f'id=$(( $(cat "{counter}") + 1 )); echo "$id" > "{counter}"; echo "$id;cluster"'))
    result = run_script("slurm_submit.sh", work, env)
    assert result.returncode == 0, result.stderr
    calls = [c.split() for c in (tmp_path / "calls.log").read_text().splitlines()
             if c.startswith("sbatch")]
    jobs = {}  # job id -> (script, argument, dependency)
    for number, call in enumerate(calls, start=101):
        dependency = next((a.split("=")[1] for a in call if a.startswith("--dependency")), "")
        script = next(a for a in call if a.endswith(".sbatch"))
        argument = call[-1] if call[-1] != script else ""
        jobs[number] = (Path(script).name, argument, dependency)
    assert jobs[101] == ("slurm_propose.sbatch", "", "")
    assert jobs[102] == ("slurm_split.sbatch", "", "")
    assert jobs[103] == ("slurm_pretrain.sbatch", "recipes/pretrain_knet.yaml", "afterok:101")
    for i, pct in enumerate(PERCENTS):
        finetune, evaluate = 104 + 2 * i, 105 + 2 * i
        assert jobs[finetune] == ("slurm_finetune.sbatch", f"recipes/finetune_knet_{pct}pct.yaml",
                                  "afterok:103:102")
        assert jobs[evaluate] == ("slurm_evaluate.sbatch", f"recipes/evaluate_knet_{pct}pct.yaml",
                                  f"afterok:{finetune}")


def test_sbatch_files_requeue_and_resume():
    for name in ("slurm_propose.sbatch", "slurm_pretrain.sbatch", "slurm_finetune.sbatch"):
        text = (LAUNCH / name).read_text()
        assert "#SBATCH --requeue" in text, name
    for name in ("slurm_pretrain.sbatch", "slurm_finetune.sbatch"):
        lines = [line for line in logical_lines((LAUNCH / name).read_text())
                 if "stages.cli" in line]
        assert len(lines) == 1 and "--resume" in lines[0], name
    propose = (LAUNCH / "slurm_propose.sbatch").read_text()
    assert "#SBATCH --array=" in propose and '--num-shards "$SLURM_ARRAY_TASK_COUNT"' in propose

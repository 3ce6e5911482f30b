"""The CLIP the package ships (``uplvp-synth-vit``): its weights load by name with the sha256 of
its card, and on a planted scene (known shapes in known colours on a plain background, drawn
here, not by the generator's random streams) its ``clip`` proposer finds every object
(IoU >= 0.5) and names its category."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.synth import CATEGORIES, SHAPES, _hsv
from uplvp_model.proposal.factory import build_proposer
from uplvp_model.proposal.shipped import file_sha256, is_shipped, shipped_model

NAME = "uplvp-synth-vit"
pytestmark = pytest.mark.skipif(not is_shipped(NAME), reason=f"{NAME} is not shipped in this tree")

# (category, centre x, centre y, radius): three objects well apart on a 144 x 144 canvas
PLANTED = [("disk", 38, 40, 22), ("star", 106, 42, 24), ("hexagon", 72, 106, 24)]


def planted_scene(planted=PLANTED, size: int = 144) -> tuple[np.ndarray, list[np.ndarray]]:
    """A mid-grey canvas with each shape filled in its category's central hue (the generator's
    colour for it), and each object's boolean mask."""
    rng = np.random.default_rng(0)
    image = np.full((size, size, 3), 0.5, np.float32)
    masks = []
    hues = {c.name: c.hue for c in CATEGORIES}
    for name, cx, cy, r in planted:
        canvas = np.zeros((size, size), np.uint8)
        SHAPES[name](canvas, rng, cx, cy, r, 0.3)
        mask = canvas.astype(bool)
        image[mask] = _hsv(hues[name], 0.8, 0.85)
        masks.append(mask)
    return (image * 255).round().astype(np.uint8), masks


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def test_the_shipped_weights_match_their_card():
    model = shipped_model(NAME)
    assert file_sha256(model.weights) == model.card["sha256"]
    assert model.card["precision"] == "fp16"
    assert model.weights.stat().st_size <= 16 * 2**20  # the size budget
    assert model.vocabulary == [c.name for c in CATEGORIES]


def test_the_shipped_model_finds_and_names_every_planted_object():
    model = shipped_model(NAME)
    proposer = build_proposer("clip", model_name=NAME, vocabulary=model.vocabulary,
                              **model.card["proposer_options"])
    image, truth = planted_scene()
    proposals = proposer.propose([image])[0]
    found = []
    for (name, *_), mask in zip(PLANTED, truth):
        best = max(proposals, key=lambda p: iou(p.mask, mask))
        found.append((name, round(iou(best.mask, mask), 2), best.label))
    print(found)
    for name, overlap, label in found:
        assert overlap >= 0.5 and label == name, found


def test_the_propose_stage_takes_the_shipped_model_by_name_and_records_it():
    from stages.propose import ProposeConfig, check_weights_given, proposal_weights

    cfg = ProposeConfig(images="m.yaml", out="o", proposer="clip", clip_model=NAME)
    check_weights_given(cfg)  # no checkpoint needed: the weights ship with the package
    assert proposal_weights(cfg) == {
        "kind": "shipped",
        "source": f"clip {NAME}: shipped with uplvp, sha256 {shipped_model(NAME).card['sha256']}"}
    from pipeline.errors import InputError

    with pytest.raises(InputError, match="needs --clip-checkpoint"):
        check_weights_given(ProposeConfig(images="m.yaml", out="o", proposer="clip",
                                          clip_model="ViT-B-16"))

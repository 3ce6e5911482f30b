"""PretrainCriterion and SetCriterion on tiny tensors (no model needed)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from uplvp_model.criterion import PretrainCriterion, SetCriterion, objectness_logits
from uplvp_model.kernel_matching import assign_prompts_batch, inject
from uplvp_model.prompts import PromptEncoder

B, N, D, G, H = 2, 6, 16, 4, 32


def _targets(num: list[int], seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for m in num:
        masks = torch.zeros(m, H, H, dtype=torch.bool)
        for j in range(m):
            x0, y0 = torch.randint(0, H // 2, (2,), generator=g).tolist()
            masks[j, y0:y0 + H // 2, x0:x0 + H // 2] = True
        out.append({"labels": torch.zeros(m, dtype=torch.long), "masks": masks})
    return out


def _box_prompts(targets: list[dict]) -> list[dict]:
    prompts = []
    for t in targets:
        boxes = []
        for mask in t["masks"]:
            ys, xs = torch.nonzero(mask, as_tuple=True)
            boxes.append([xs.min() / H, ys.min() / H, (xs.max() + 1) / H, (ys.max() + 1) / H])
        grids = torch.nn.functional.interpolate(t["masks"][:, None].float(), size=(G, G), mode="area")[:, 0]
        prompts.append({"boxes": torch.tensor(boxes).reshape(-1, 4), "shape_grids": (grids > 0.5).float(),
                        "embeddings": None})
    return prompts


class TinyHeads(nn.Module):
    """Stand-in for the decoder: masks = kernels . pixel embedding, logits = linear(kernels)."""

    def __init__(self) -> None:
        super().__init__()
        self.cls = nn.Linear(D, 2)
        self.refine = nn.Linear(D, D)

    def forward(self, kernels: torch.Tensor, pixels: torch.Tensor) -> dict:
        stages = [kernels, kernels + self.refine(kernels)]
        outs = [{"pred_logits": self.cls(k), "pred_masks": torch.einsum("bnd,bdhw->bnhw", k, pixels), "kernels": k}
                for k in stages]
        return {**outs[-1], "aux_outputs": outs[:-1]}


def _pretrain_step(criterion: PretrainCriterion, step: int = 0, seed: int = 0):
    torch.manual_seed(seed)
    encoder = PromptEncoder(D, None, G, use_embedding=False)
    heads = TinyHeads()
    init_kernels = nn.Parameter(torch.randn(N, D))
    features = torch.randn(B, D, 4, 4)
    pixels = torch.randn(B, D, 8, 8)
    targets = _targets([3, 2], seed)
    prompts = encoder(features, _box_prompts(targets))
    kernels0 = init_kernels.expand(B, N, D)
    k2p = assign_prompts_batch(prompts, kernels0, "spread", prompts_per_image=3)
    injected = inject(kernels0, prompts, k2p, dropout=0.1, generator=torch.Generator().manual_seed(seed))
    outputs = heads(injected.kernels, pixels)
    for t, p in zip(targets, prompts):
        t["prompts"] = p
    for tensor in (outputs["pred_logits"], outputs["pred_masks"], outputs["kernels"]):
        tensor.retain_grad()
    losses = criterion(outputs, targets, kernel_to_prompt=k2p, step=step, generator=torch.Generator().manual_seed(seed))
    return losses, outputs, encoder, init_kernels


def test_pretrain_step_is_finite_and_reaches_every_input():
    criterion = PretrainCriterion(num_points=32, identity_warmup_steps=10)
    losses, outputs, encoder, init_kernels = _pretrain_step(criterion, step=5)
    names = {f"loss_{t}{s}" for t in ("focal", "bce", "dice", "embedding") for s in ("", "_aux0")}
    assert set(losses) == names | {"loss"}
    assert all(torch.isfinite(v) for v in losses.values())
    torch.testing.assert_close(losses["loss"], sum(v for k, v in losses.items() if k != "loss"))
    losses["loss"].backward()
    for name in ("pred_logits", "pred_masks", "kernels"):
        grad = outputs[name].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    assert init_kernels.grad.abs().sum() > 0
    for name, param in encoder.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    assert encoder.pooled_proj.weight.grad.abs().sum() > 0


def test_pretrain_losses_are_deterministic():
    a, *_ = _pretrain_step(PretrainCriterion(num_points=16), seed=3)
    b, *_ = _pretrain_step(PretrainCriterion(num_points=16), seed=3)
    assert all(torch.equal(a[k], b[k]) for k in a)


def _perfect_outputs(targets: list[dict], kernel_to_target: list[list[int]]) -> dict:
    """Kernels equal to their target's prompt, confident object logits, exact mask logits."""
    logits = torch.tensor([-10.0, 10.0]).repeat(B, N, 1)  # no object
    masks = torch.full((B, N, H, H), -30.0)
    kernels = torch.randn(B, N, D, generator=torch.Generator().manual_seed(9))
    for i, order in enumerate(kernel_to_target):
        for n, m in enumerate(order):
            if m >= 0:
                logits[i, n] = torch.tensor([10.0, -10.0])
                masks[i, n][targets[i]["masks"][m]] = 30.0
                kernels[i, n] = targets[i]["prompts"][m] * 3
    return {"pred_logits": logits, "pred_masks": masks, "kernels": kernels, "aux_outputs": []}


def test_perfect_predictions_give_near_zero_mask_and_embedding_loss():
    targets = _targets([3, 2])
    for t in targets:
        t["prompts"] = torch.randn(len(t["labels"]), D)
    outputs = _perfect_outputs(targets, [[-1, 2, 0, 1, -1, -1], [1, -1, -1, -1, 0, -1]])
    losses = PretrainCriterion(num_points=None)(outputs, targets)
    assert losses["loss_bce"] < 1e-6 and losses["loss_dice"] < 1e-6
    assert losses["loss_embedding"].abs() < 1e-6 and losses["loss_focal"] < 1e-6


def test_identity_assignment_at_full_weight_follows_the_prompts():
    targets = _targets([2, 1])
    for t in targets:
        t["prompts"] = torch.randn(len(t["labels"]), D)
    outputs = _perfect_outputs(targets, [[0, 1, -1, -1, -1, -1], [0, -1, -1, -1, -1, -1]])
    # kernels 4, 5 (image 0) and 5 (image 1) "received" the prompts but predict nothing
    k2p = [torch.tensor([-1, -1, -1, -1, 0, 1]), torch.tensor([-1, -1, -1, -1, -1, 0])]
    criterion = PretrainCriterion(num_points=None, identity_warmup_steps=10)
    early = criterion(outputs, targets, kernel_to_prompt=k2p, step=0)
    late = criterion(outputs, targets, kernel_to_prompt=k2p, step=10)
    assert early["loss_bce"] < 1e-6  # at weight 0.1 the mask cost still wins
    assert late["loss_bce"] > 1.0  # at weight 1 the prompt receivers are supervised


def test_all_empty_targets_give_finite_loss_and_zero_mask_terms():
    targets = [{"labels": torch.zeros(0, dtype=torch.long), "masks": torch.zeros(0, H, H, dtype=torch.bool),
                "prompts": torch.zeros(0, D)} for _ in range(B)]
    outputs = {"pred_logits": torch.zeros(B, N, 2, requires_grad=True),
               "pred_masks": torch.zeros(B, N, 8, 8, requires_grad=True),
               "kernels": torch.randn(B, N, D, requires_grad=True)}
    losses = PretrainCriterion(num_points=8)(outputs, targets, kernel_to_prompt=[torch.full((N,), -1)] * B)
    for name in ("loss_bce", "loss_dice", "loss_embedding"):
        assert losses[name].item() == 0.0
    # objectness logit 0 for every kernel, all negatives: 2 * B * N * 0.75 * 0.25 * ln2 / 1
    assert losses["loss_focal"].item() == pytest.approx(2 * B * N * 0.1875 * math.log(2), rel=1e-5)
    losses["loss"].backward()
    assert all(torch.isfinite(outputs[k].grad).all() for k in ("pred_logits", "pred_masks", "kernels"))


def test_text_loss_trains_its_projection():
    targets = _targets([2, 1])
    vocabulary = torch.randn(5, 8)
    for t in targets:
        t["prompts"] = torch.randn(len(t["labels"]), D)
        t["text_embeddings"] = vocabulary
        t["label_index"] = torch.arange(len(t["labels"]))
    criterion = PretrainCriterion(num_points=8, text_weight=0.5, kernel_dim=D, text_dim=8)
    outputs = _perfect_outputs(targets, [[0, 1, -1, -1, -1, -1], [0, -1, -1, -1, -1, -1]])
    losses = criterion(outputs, targets)
    assert torch.isfinite(losses["loss_text"]) and losses["loss_text"] > 0
    losses["loss"].backward()
    assert criterion.text_projection.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError):
        PretrainCriterion(text_weight=1.0)


def test_missing_prompts_raise_value_error():
    targets = _targets([1, 1])
    outputs = {"pred_logits": torch.zeros(B, N, 2), "pred_masks": torch.zeros(B, N, 8, 8),
               "kernels": torch.zeros(B, N, D)}
    with pytest.raises(ValueError, match="prompts"):
        PretrainCriterion()(outputs, targets)
    assert "loss_embedding" not in PretrainCriterion(embedding_weight=0.0, num_points=4)(outputs, targets)


def test_objectness_logits_is_object_log_odds():
    logits = torch.tensor([[[1.0, 3.0], [2.0, -1.0]]])
    torch.testing.assert_close(objectness_logits(logits), torch.tensor([[-2.0, 3.0]]))
    torch.testing.assert_close(objectness_logits(logits).sigmoid(), logits.softmax(-1)[..., 0])


def test_set_criterion_exact_ce_and_gradients():
    targets = [{"labels": torch.tensor([1]), "masks": torch.ones(1, H, H, dtype=torch.bool)},
               {"labels": torch.zeros(0, dtype=torch.long), "masks": torch.zeros(0, H, H, dtype=torch.bool)}]
    outputs = {"pred_logits": torch.zeros(B, 2, 3, requires_grad=True),
               "pred_masks": torch.zeros(B, 2, 8, 8, requires_grad=True), "kernels": torch.zeros(B, 2, D)}
    outputs["aux_outputs"] = [{k: v for k, v in outputs.items()}]
    losses = SetCriterion(num_points=None)(outputs, targets)
    assert set(losses) == {f"loss_{t}{s}" for t in ("ce", "bce", "dice") for s in ("", "_aux0")} | {"loss"}
    # uniform logits over 3 classes: CE = ln 3 for every kernel, whatever the weights
    assert losses["loss_ce"].item() == pytest.approx(2.0 * math.log(3), rel=1e-6)
    assert losses["loss_bce"].item() == pytest.approx(5.0 * math.log(2), rel=1e-6)
    assert losses["loss_dice"].item() == pytest.approx(5.0 * (1 - (64 + 1) / (32 + 64 + 1)), rel=1e-6)
    losses["loss"].backward()
    assert outputs["pred_logits"].grad.abs().sum() > 0 and outputs["pred_masks"].grad.abs().sum() > 0


def test_set_criterion_no_object_weight_changes_ce():
    targets = [{"labels": torch.tensor([0]), "masks": torch.ones(1, H, H, dtype=torch.bool)}]
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])
    outputs = {"pred_logits": logits, "pred_masks": torch.zeros(1, 2, 8, 8), "kernels": torch.zeros(1, 2, D)}
    ce = SetCriterion(num_points=None, ce_weight=1.0)(outputs, targets)["loss_ce"]
    # kernel 0 -> class 0 (weight 1), kernel 1 -> no object (weight 0.1)
    l0 = -torch.log_softmax(logits[0, 0], -1)[0]
    l1 = -torch.log_softmax(logits[0, 1], -1)[2]
    assert ce.item() == pytest.approx(((l0 + 0.1 * l1) / 1.1).item(), rel=1e-6)


def test_set_criterion_rejects_prompts_and_bad_labels():
    targets = [{"labels": torch.tensor([2]), "masks": torch.ones(1, H, H, dtype=torch.bool)}]
    outputs = {"pred_logits": torch.zeros(1, 2, 3), "pred_masks": torch.zeros(1, 2, 8, 8),
               "kernels": torch.zeros(1, 2, D)}
    with pytest.raises(ValueError):
        SetCriterion()(outputs, targets)
    with pytest.raises(ValueError):
        SetCriterion()(outputs, [{"labels": torch.tensor([0]), "masks": targets[0]["masks"]}],
                       kernel_to_prompt=[torch.zeros(2, dtype=torch.long)])


def test_set_criterion_matching_costs_follow_its_loss_weights():
    # kernel 0: right class, wrong mask; kernel 1: wrong class, right mask
    target = torch.zeros(1, 8, 8, dtype=torch.bool)
    target[0, :4] = True
    targets = [{"labels": torch.tensor([0]), "masks": target}]
    logits = torch.tensor([[[5.0, 0.0, 0.0], [0.0, 5.0, 0.0]]])
    masks = torch.stack([torch.where(target[0], -9.0, 9.0), torch.where(target[0], 9.0, -9.0)])[None]
    by_class = SetCriterion(num_points=None, ce_weight=1.0, bce_weight=0.0, dice_weight=0.0)
    by_mask = SetCriterion(num_points=None, ce_weight=0.0, bce_weight=1.0, dice_weight=1.0)
    assert (by_class.matcher.class_weight, by_class.matcher.bce_weight) == (1.0, 0.0)
    assert by_class.matcher(logits, masks, targets)[0][0].tolist() == [0]
    assert by_mask.matcher(logits, masks, targets)[0][0].tolist() == [1]


def test_set_criterion_importance_sampling_weights_the_uncertain_pixels():
    # one matched kernel; its mask is exactly right (+-20) except a band of logit 0 in columns
    # 1-2 of 8 (BCE ln 2 whatever the target): the uniform BCE averages that quarter of the
    # width with ~0 elsewhere, the importance-sampled BCE (points in the band) is ~ln 2
    target = torch.ones(1, H, H, dtype=torch.bool)
    target[0, :, : H // 2] = False
    mask = torch.where(torch.nn.functional.interpolate(target[None].float(), size=(8, 8))[0, 0] > 0.5,
                       20.0, -20.0)
    mask[:, 1:3] = 0.0
    outputs = {"pred_logits": torch.tensor([[[5.0, 0.0]]]), "pred_masks": mask[None, None],
               "kernels": torch.zeros(1, 1, D)}
    targets = [{"labels": torch.tensor([0]), "masks": target}]
    kwargs = dict(num_points=400, ce_weight=0.0, bce_weight=1.0, dice_weight=0.0)
    uniform = SetCriterion(**kwargs)(outputs, targets, generator=torch.Generator().manual_seed(0))
    important = SetCriterion(importance_sample_ratio=1.0, oversample_ratio=8.0, **kwargs)(
        outputs, targets, generator=torch.Generator().manual_seed(0))
    assert uniform["loss_bce"].item() < 0.5 * math.log(2)
    assert important["loss_bce"].item() > 0.9 * math.log(2)
    with pytest.raises(ValueError):
        SetCriterion(importance_sample_ratio=2.0)

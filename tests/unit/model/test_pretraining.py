"""A real pre-training step: tiny QEIS model + prompt encoder + matching + kernel supervision."""

import pytest
import torch

from uplvp_model.config import model_config
from uplvp_model.criterion import PretrainCriterion
from uplvp_model.model import build_model
from uplvp_model.pretraining import PromptedModel, pretraining_targets
from uplvp_model.prompts import PromptEncoder

H = W = 64
GRID = 8
EMB = 6


def _scene(seed: int = 0):
    """One image with three bright rectangles on a dark background, and their masks/prompts."""
    # x0, y0, x1, y1 (exclusive), on the stride-4 grid of the mask features
    boxes = [(4, 8, 24, 32), (36, 8, 60, 24), (20, 40, 52, 60)]
    image = torch.full((3, H, W), -1.0)
    masks = torch.zeros(len(boxes), H, W, dtype=torch.bool)
    for k, (x0, y0, x1, y1) in enumerate(boxes):
        masks[k, y0:y1, x0:x1] = True
        image[k % 3, y0:y1, x0:x1] = 1.5
    gen = torch.Generator().manual_seed(seed)
    prompt = {
        "boxes": torch.tensor([[x0 / W, y0 / H, x1 / W, y1 / H] for x0, y0, x1, y1 in boxes]),
        "shape_grids": torch.ones(len(boxes), GRID, GRID),
        "embeddings": torch.nn.functional.normalize(torch.randn(len(boxes), EMB, generator=gen), dim=1),
    }
    return image, masks, prompt


def _prompted(strategy="spread", inject_prompts=True):
    torch.manual_seed(0)
    model = build_model(model_config("tiny"))
    encoder = PromptEncoder(model.cfg.hidden_dim, EMB, GRID)
    return PromptedModel(model, encoder, strategy=strategy, prompts_per_image=5,
                         inject_prompts=inject_prompts)


@pytest.mark.parametrize("strategy", ["spread", "cosine", "hungarian"])
def test_gradient_reaches_kernels_prompt_encoder_and_decoder(strategy):
    prompted = _prompted(strategy)
    image, masks, prompt = _scene()
    images = torch.stack([image, image.flip(-1)])
    batch_masks = [masks, masks.flip(-1)]
    outputs = prompted(images, [prompt, prompt], generator=torch.Generator().manual_seed(1))
    assert len(outputs["kernel_to_prompt"]) == 2
    criterion = PretrainCriterion(num_points=None)
    losses = criterion(outputs, pretraining_targets(outputs, batch_masks),
                       kernel_to_prompt=outputs["kernel_to_prompt"], step=0)
    assert torch.isfinite(losses["loss"])
    losses["loss"].backward()

    def grad_norm(module_or_param):
        params = [module_or_param] if isinstance(module_or_param, torch.nn.Parameter) else list(
            module_or_param.parameters())
        return sum(p.grad.abs().sum().item() for p in params if p.grad is not None)

    assert grad_norm(prompted.model.decoder.init_kernels.weight) > 0
    assert grad_norm(prompted.model.decoder) > 0
    assert grad_norm(prompted.model.pixel_decoder) > 0
    for name, part in prompted.prompt_encoder.named_children():
        assert grad_norm(part) > 0, f"no gradient reached prompt encoder part {name}"


def test_without_injection_kernels_are_the_learned_ones():
    prompted = _prompted(inject_prompts=False).eval()
    image, _, prompt = _scene()
    outputs = prompted(image[None], [prompt])
    assert outputs["kernel_to_prompt"] is None
    plain = prompted.model(image[None])
    assert torch.equal(outputs["pred_masks"], plain["pred_masks"])


def _mask_iou(pred: torch.Tensor, target: torch.Tensor) -> float:
    inter = (pred & target).sum().item()
    return inter / max((pred | target).sum().item(), 1)


def test_tiny_prompted_model_overfits_one_image_with_kernel_supervision():
    prompted = _prompted("hungarian")
    prompted.dropout = 0.0
    image, masks, prompt = _scene()
    criterion = PretrainCriterion(num_points=None, identity_warmup_steps=20)
    optimizer = torch.optim.AdamW(prompted.parameters(), lr=3e-3)
    for step in range(300):
        outputs = prompted(image[None], [prompt])
        losses = criterion(outputs, pretraining_targets(outputs, [masks]),
                           kernel_to_prompt=outputs["kernel_to_prompt"], step=step)
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
    prompted.eval()
    with torch.no_grad():
        outputs = prompted(image[None], [prompt])
    pred = torch.nn.functional.interpolate(outputs["pred_masks"], size=(H, W), mode="bilinear") > 0
    k2p = outputs["kernel_to_prompt"][0]
    for p in range(3):
        kernel = int((k2p == p).nonzero()[0])  # the kernel that received prompt p predicts mask p
        assert _mask_iou(pred[0, kernel], masks[p]) > 0.9

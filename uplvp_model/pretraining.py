"""The unit that UPLVP pre-training trains: QEIS model + prompt encoder + prompt-kernel
matching and injection (method.md Part 2), producing what the kernel-supervision criterion
(``PretrainCriterion``, Part 3) needs.

    prompted = PromptedModel(model, PromptEncoder(...), strategy="spread")
    outputs = prompted(images, prompt_inputs)               # model outputs + matching results
    losses = criterion(outputs, pretraining_targets(outputs, masks),
                       kernel_to_prompt=outputs["kernel_to_prompt"], step=step)
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .kernel_matching import STRATEGIES, assign_prompts_batch, inject
from .model import QEISModel
from .prompts import PromptEncoder


class PromptedModel(nn.Module):
    """``forward(images, prompts)`` -> the model's output dict plus:

    - ``"prompts"``: B tensors [P_i, D], the encoded prompts;
    - ``"kernel_to_prompt"``: B LongTensors [N], the prompt each kernel actually received
      (-1 for none or dropped), i.e. ``InjectionResult.received``; None without injection;
    - ``"dropped"``: B BoolTensors [P_i].

    ``prompts`` is one dict per image as :class:`PromptEncoder` takes it (``boxes`` [P, 4]
    normalised xyxy, ``shape_grids`` [P, G, G], ``embeddings`` [P, E], optional ``masks``).
    With ``inject_prompts=False`` the prompts are encoded (for the embedding loss) but not added
    to the kernels: the "pseudo masks without prompt injection" ablation.

    ``text_projection`` (optional): the criterion's ``PretrainCriterion.text_projection``, held
    here so that the trainer optimises, synchronises (DDP) and checkpoints it with the model;
    ``forward`` does not use it (the text loss does).
    """

    def __init__(
        self,
        model: QEISModel,
        prompt_encoder: PromptEncoder,
        *,
        strategy: str = "spread",
        prompts_per_image: int = 20,
        dropout: float = 0.1,
        inject_prompts: bool = True,
        text_projection: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        self.model = model
        self.prompt_encoder = prompt_encoder
        self.strategy = strategy
        self.prompts_per_image = prompts_per_image
        self.dropout = dropout
        self.inject_prompts = inject_prompts
        self.text_projection = text_projection

    def forward(
        self, images: Tensor, prompts: list[dict], generator: torch.Generator | None = None
    ) -> dict:
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompt dicts")
        features = self.model.extract_features(images)
        encoded = self.prompt_encoder(features["prompt_features"], prompts)
        kernels = self.model.initial_kernels(images.shape[0])
        kernel_to_prompt = assign_prompts_batch(
            encoded, kernels, self.strategy, prompts_per_image=self.prompts_per_image
        )
        if self.inject_prompts:
            injected = inject(
                kernels, encoded, kernel_to_prompt, self.dropout, generator, self.training
            )
            kernels, received, dropped = injected.kernels, injected.received, injected.dropped
        else:
            received = None  # nothing injected: the criterion matches on predictions alone
            dropped = [torch.ones(p.shape[0], dtype=torch.bool) for p in encoded]
        outputs = self.model.decode(features, kernels)
        outputs.update(prompts=encoded, kernel_to_prompt=received, dropped=dropped)
        return outputs


def pretraining_targets(outputs: dict, masks: list[Tensor]) -> list[dict]:
    """Criterion targets: pseudo mask p of image i is target p, supervised with prompt p.

    ``masks``: B BoolTensors [P_i, H, W] (the pseudo masks, in the same order as the prompts).
    """
    targets = []
    for image_masks, image_prompts in zip(masks, outputs["prompts"]):
        if image_masks.shape[0] != image_prompts.shape[0]:
            raise ValueError(
                f"{image_masks.shape[0]} pseudo masks but {image_prompts.shape[0]} prompts"
            )
        targets.append(
            {
                "labels": torch.zeros(image_masks.shape[0], dtype=torch.long,
                                      device=image_masks.device),
                "masks": image_masks,
                "prompts": image_prompts,
            }
        )
    return targets

"""Self-supervised backbone pre-training objectives: MoCo v2 and DenseCL, on lightly's parts.

``SelfSupervisedModel(backbone, objective="mocov2")`` wraps one of our backbones
(:mod:`uplvp_model.backbone`) in a query/key (momentum) encoder pair; a call on two augmented
views of the same images returns the loss terms::

    model = SelfSupervisedModel(build_backbone("resnet18"), objective="densecl")
    terms = model(view_q, view_k)            # {"loss", "loss_global"[, "loss_dense"]}

- **mocov2** (the paper's backbone; MoCo v2, arXiv 2003.04297): the coarsest map c5, averaged,
  through a 2-layer MLP head (lightly's ``MoCoProjectionHead``); InfoNCE of the query against
  its key with the negatives of a queue of earlier keys (lightly's ``NTXentLoss`` with a memory
  bank). The key encoder is an exponential moving average of the query encoder, updated (with
  ``momentum``) at the start of every call in training mode.
- **densecl** (DenseCL, arXiv 2011.09157): MoCo v2's global term plus a dense term: every c5
  location of the query view through a dense 2-layer head (lightly's ``DenseCLProjectionHead``),
  its positive the key-view location whose *backbone* feature is most similar (lightly's
  ``select_most_similar``), negatives from a second queue of dense keys;
  ``loss = (1 - dense_weight) * global + dense_weight * dense``.

The queues are lightly memory banks made persistent here, so that they are part of the model's
``state_dict`` and a resumed run continues exactly. Under ``torch.distributed`` the keys are
gathered from every rank before they are queued, and the key encoder's batch is shuffled across
ranks (MoCo's shuffling BatchNorm), so that a rank's BatchNorm statistics cannot tell a query
its key.

Only ``backbone`` (the query encoder) is what downstream stages use; its keys are the
backbone's (``backbone.body.*``).
"""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .backbone import Backbone

OBJECTIVES = ("mocov2", "densecl")


def _lightly():
    """lightly's modules, or one clear error naming the extra to install."""
    try:
        from lightly.loss import NTXentLoss
        from lightly.models import utils
        from lightly.models.modules.heads import DenseCLProjectionHead, MoCoProjectionHead
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            f"self-supervised pre-training needs the 'lightly' package ({err}); install "
            "uplvp with its ssl extra: pip install 'uplvp[ssl]'") from None
    return NTXentLoss, utils, DenseCLProjectionHead, MoCoProjectionHead


def _persistent_bank(loss: nn.Module) -> nn.Module:
    """Register the memory bank buffers of a lightly loss as persistent (lightly leaves them
    out of ``state_dict``; a resumed run must continue with the same negatives)."""
    bank = loss.memory_bank
    for name in ("bank", "bank_ptr"):
        bank.register_buffer(name, getattr(bank, name), persistent=True)
    return loss


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class SelfSupervisedModel(nn.Module):
    """Query encoder (``backbone`` + heads), its momentum copy and the contrastive losses.

    Args:
        backbone: an :class:`~uplvp_model.backbone.Backbone` (trained BatchNorm).
        objective: ``"mocov2"`` or ``"densecl"``.
        projection_dim / hidden_dim: widths of the MLP heads (MoCo v2: 128 / 2048).
        queue_size: keys in the global queue; ``dense_queue_size`` in the dense one.
        temperature: InfoNCE temperature (MoCo v2: 0.2).
        momentum: key encoder EMA factor per step (MoCo v2: 0.999 over 1.28 M images; a few
            thousand images need a faster key encoder, e.g. 0.99).
        dense_weight: DenseCL's lambda (0.5).
    """

    def __init__(self, backbone: Backbone, objective: str = "mocov2", *,
                 projection_dim: int = 128, hidden_dim: int = 2048, queue_size: int = 4096,
                 dense_queue_size: int = 4096, temperature: float = 0.2,
                 momentum: float = 0.99, dense_weight: float = 0.5) -> None:
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if not 0.0 <= dense_weight <= 1.0:
            raise ValueError(f"dense_weight must be in [0, 1], got {dense_weight}")
        NTXentLoss, utils, DenseHead, MoCoHead = _lightly()
        self._utils = utils
        self.objective = objective
        self.momentum = momentum
        self.dense_weight = dense_weight if objective == "densecl" else 0.0
        width = backbone.out_channels[-1]
        self.backbone = backbone
        self.projection = MoCoHead(width, hidden_dim, projection_dim)
        self.dense_projection = (DenseHead(width, hidden_dim, projection_dim)
                                 if objective == "densecl" else None)
        gather = _distributed()
        self.criterion = _persistent_bank(NTXentLoss(
            temperature, memory_bank_size=(queue_size, projection_dim), gather_distributed=gather))
        self.dense_criterion = (_persistent_bank(NTXentLoss(
            temperature, memory_bank_size=(dense_queue_size, projection_dim),
            gather_distributed=gather)) if objective == "densecl" else None)
        # the key encoder: built last, so that the query encoder's initial weights do not
        # depend on it; a copy, never trained by the optimizer
        self.backbone_momentum = copy.deepcopy(backbone)
        self.projection_momentum = copy.deepcopy(self.projection)
        self.dense_projection_momentum = copy.deepcopy(self.dense_projection)
        for module in self._momentum_modules():
            utils.deactivate_requires_grad(module)

    def _query_modules(self) -> list[nn.Module]:
        return [m for m in (self.backbone, self.projection, self.dense_projection) if m is not None]

    def _momentum_modules(self) -> list[nn.Module]:
        return [m for m in (self.backbone_momentum, self.projection_momentum,
                            self.dense_projection_momentum) if m is not None]

    @torch.no_grad()
    def update_momentum(self) -> None:
        """key encoder <- momentum * key encoder + (1 - momentum) * query encoder."""
        for query, key in zip(self._query_modules(), self._momentum_modules()):
            self._utils.update_momentum(query, key, self.momentum)

    def _encode(self, images: Tensor, backbone: nn.Module, head: nn.Module,
                dense_head: nn.Module | None) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """-> (global projection [B, P], dense projections [B, L, P] or None, backbone
        features per location [B, L, C] or None)."""
        c5 = backbone(images)[-1]  # [B, C, h, w]
        pooled = c5.mean(dim=(2, 3))
        projected = head(pooled)
        if dense_head is None:
            return projected, None, None
        locations = c5.flatten(2).transpose(1, 2)  # [B, h*w, C]
        return projected, dense_head(locations), locations

    def forward(self, view_q: Tensor, view_k: Tensor) -> dict[str, Tensor]:
        """Loss terms of a batch of view pairs (``view_q``, ``view_k``: [B, 3, H, W], the same
        images under two augmentations). In training mode the key encoder is first moved
        towards the query encoder and the keys are queued after the loss is computed."""
        if self.training:
            self.update_momentum()
        q, q_dense, q_feats = self._encode(view_q, self.backbone, self.projection,
                                           self.dense_projection)
        with torch.no_grad():
            k, k_dense, k_feats = self._keys(view_k)
        loss_global = self.criterion(q, k)
        terms = {"loss_global": loss_global}
        if self.dense_criterion is None:
            terms["loss"] = loss_global
            return terms
        # each query location's positive: the key location with the most similar backbone
        # feature (DenseCL's correspondence, from the detached features)
        k_dense = self._utils.select_most_similar(q_feats.detach(), k_feats, k_dense)
        loss_dense = self.dense_criterion(q_dense.flatten(end_dim=1), k_dense.flatten(end_dim=1))
        terms["loss_dense"] = loss_dense
        terms["loss"] = (1.0 - self.dense_weight) * loss_global + self.dense_weight * loss_dense
        return terms

    def _keys(self, view_k: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """The key encoder's outputs; across ranks the batch is shuffled first and restored
        after (MoCo's shuffling BatchNorm)."""
        shuffle = _distributed() and self.training
        if shuffle:
            view_k, order = self._utils.batch_shuffle_distributed(view_k)
        k, k_dense, k_feats = self._encode(view_k, self.backbone_momentum,
                                           self.projection_momentum, self.dense_projection_momentum)
        if shuffle:
            k = self._utils.batch_unshuffle_distributed(k, order)
            if k_dense is not None:
                k_dense = self._utils.batch_unshuffle_distributed(k_dense, order)
                k_feats = self._utils.batch_unshuffle_distributed(k_feats, order)
        return k, k_dense, k_feats


def backbone_state(model: SelfSupervisedModel) -> dict[str, Tensor]:
    """The query encoder's backbone weights under the keys ``backbone.body.*`` (what
    :func:`uplvp_model.checkpoint.load_backbone_checkpoint` reads), detached CPU copies."""
    return {f"backbone.{k}": v.detach().cpu().clone()
            for k, v in model.backbone.state_dict().items()}


def global_embedding(backbone: Backbone, images: Tensor) -> Tensor:
    """[B, C] average-pooled, L2-normalised c5 features (what the probes read)."""
    return F.normalize(backbone(images)[-1].mean(dim=(2, 3)), dim=1)

"""Instance masks in the compact form they take between a DataLoader worker and the trainer.

A batch's ``targets[i]["masks"]`` is a bool tensor ``[M, H, W]`` at the padded batch size: at
800 x 1333 px, 50 instances are 53 MB per image, almost all of it ``False`` outside each
object's box. :class:`CompactMasks` keeps, per mask, its bounding box (rows ``y0:y1``, columns
``x0:x1`` of the padded frame; an empty mask has an empty box) and only the pixels inside it,
bit-packed (``numpy.packbits``): 8 bits per byte and nothing outside the boxes. A worker builds
it from the sample's unpadded masks (the padding is bottom/right, so boxes are the same in both
frames); the main process expands it back with :meth:`CompactMasks.to_dense`, exactly (tests
compare the round trip bit for bit), optionally straight into pinned memory for a
non-blocking copy to the GPU.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class CompactMasks:
    """``shape`` (M, H, W) of the dense masks; ``boxes`` int64 [M, 4] = (y0, y1, x0, x1), end
    exclusive; ``bits`` uint8: the box crops in mask order, each row-major, concatenated and
    bit-packed."""

    shape: tuple[int, int, int]
    boxes: np.ndarray
    bits: np.ndarray

    @classmethod
    def from_dense(cls, masks: np.ndarray, frame: tuple[int, int] | None = None) -> "CompactMasks":
        """Compact bool masks ``[M, h, w]`` placed at the top-left of a ``frame`` (H, W) >=
        (h, w) (default: their own size)."""
        masks = np.asarray(masks, dtype=bool)
        if masks.ndim != 3:
            raise ValueError(f"masks must be [M, H, W], got shape {masks.shape}")
        count, h, w = masks.shape
        frame_h, frame_w = frame if frame is not None else (h, w)
        if frame_h < h or frame_w < w:
            raise ValueError(f"frame {frame} is smaller than the masks ({h}, {w})")
        rows, cols = masks.any(axis=2), masks.any(axis=1)
        nonempty = rows.any(axis=1)
        y0 = np.where(nonempty, rows.argmax(axis=1), 0)
        y1 = np.where(nonempty, h - rows[:, ::-1].argmax(axis=1), 0)
        x0 = np.where(nonempty, cols.argmax(axis=1), 0)
        x1 = np.where(nonempty, w - cols[:, ::-1].argmax(axis=1), 0)
        boxes = np.stack([y0, y1, x0, x1], axis=1).astype(np.int64).reshape(count, 4)
        crops = [masks[i, a:b, c:d].ravel() for i, (a, b, c, d) in enumerate(boxes)]
        flat = np.concatenate(crops) if crops else np.zeros(0, dtype=bool)
        return cls((count, int(frame_h), int(frame_w)), boxes, np.packbits(flat))

    @property
    def nbytes(self) -> int:
        """Bytes of the compact arrays (what crosses the process boundary, besides pickling)."""
        return int(self.boxes.nbytes + self.bits.nbytes)

    @property
    def dense_nbytes(self) -> int:
        """Bytes of the bool tensor :meth:`to_dense` returns."""
        count, h, w = self.shape
        return count * h * w

    def to_dense(self, pin_memory: bool = False) -> torch.Tensor:
        """The bool tensor ``[M, H, W]``; in page-locked memory when ``pin_memory``."""
        if pin_memory:  # CUDA's caching host allocator reuses its page-locked blocks
            dense = torch.zeros(self.shape, dtype=torch.bool, pin_memory=True)
        else:  # calloc: pages nobody writes stay unmapped zeros (torch.zeros would touch all)
            dense = torch.from_numpy(np.zeros(self.shape, dtype=bool))
        view = dense.numpy()
        heights = self.boxes[:, 1] - self.boxes[:, 0]
        widths = self.boxes[:, 3] - self.boxes[:, 2]
        flat = np.unpackbits(self.bits, count=int((heights * widths).sum())).view(bool)
        offset = 0
        for i, (y0, y1, x0, x1) in enumerate(self.boxes.tolist()):
            area = (y1 - y0) * (x1 - x0)
            if area:
                view[i, y0:y1, x0:x1] = flat[offset : offset + area].reshape(y1 - y0, x1 - x0)
                offset += area
        return dense


def expand_batch_masks(batch: dict, pin_memory: bool = False) -> dict:
    """``batch`` with every :class:`CompactMasks` target expanded to its bool tensor (in place;
    returns the batch)."""
    for target in batch.get("targets", []):
        masks = target["masks"]
        if isinstance(masks, CompactMasks):
            target["masks"] = masks.to_dense(pin_memory=pin_memory)
    return batch

"""Dense open-vocabulary CLIP features (MaskCLIP recipe) and the ``clip`` proposer.

Dense features, for an open_clip ``VisionTransformer`` and a batch ``[B, 3, H, W]``:
patch-embed, prepend the class token, add the positional embedding (bicubic-interpolated to the
input's patch grid when it differs from the pre-training grid), ``ln_pre``, run every block but
the last unchanged; in the last block keep only the value path of the attention:
``out_proj(v_proj(ln_1(x)))`` (times the block's layer scale, if any). As in MaskCLIP, the
query/key attention, the residual connection and the MLP of that block are all skipped (adding
the residual or the MLP back is reported to hurt dense quality). Then ``ln_post`` and ``@ proj``
per token, drop the class token, L2-normalise each patch: ``[B, E, H / p, W / p]``.
"""
from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

from .base import Letterbox, ProposedMask, letterbox_batch, mask_to_canvas
from .registry import PROPOSERS
from .ingredients import mask_pooled_embedding
from .masks import masks_from_probability_maps
from .shipped import is_shipped, shipped_model
from .text import TEXT_EMBEDDING_CACHE, TextEmbeddingCache
from .vocabulary import (
    BACKGROUND_WORDS,
    COCO_CLASSES,
    PROMPT_TEMPLATES,
    check_templates,
    check_vocabulary,
)

logger = logging.getLogger(__name__)

RANDOM_INIT_SEED = 0
LOCAL_DIR_PREFIX = "local-dir:"


@dataclass
class LoadedClip:
    """An open_clip model ready for inference.

    model: the CLIP model (eval mode, on its device); tokenizer: strings -> int64 tokens;
    mean/std: the RGB normalisation its weights expect; pretrained: False for random weights;
    model_key: identifies the weights, for caches; source: what was loaded, for messages.
    """

    model: torch.nn.Module
    tokenizer: Callable[[list[str]], torch.Tensor]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    pretrained: bool
    model_key: str
    source: str


def _cached_tag_file(tag_cfg: dict[str, Any]) -> str | None:
    """Local file of an open_clip pretrained tag if it is already in the Hugging Face hub cache
    or open_clip's URL cache (``~/.cache/clip``); never downloads."""
    hf_hub = tag_cfg.get("hf_hub", "")
    if hf_hub:
        from huggingface_hub import try_to_load_from_cache

        repo_id, filename = os.path.split(hf_hub)
        filename = filename or HF_WEIGHTS_NAME
        candidates = [HF_SAFE_WEIGHTS_NAME] if filename == HF_WEIGHTS_NAME else []
        if filename.endswith((".bin", ".pth")) and filename != HF_WEIGHTS_NAME:
            candidates.append(filename[:-4] + ".safetensors")
        for name in [*candidates, filename]:
            cached = try_to_load_from_cache(repo_id, name)
            if isinstance(cached, str) and os.path.isfile(cached):
                return cached
    url = tag_cfg.get("url", "")
    if url:
        cached = os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(url))
        if os.path.isfile(cached):
            return cached
    return None


def _has_weight_file(folder: Path) -> bool:
    return any(any(folder.glob(pattern)) for pattern in ("*.safetensors", "*.bin", "*.pth"))


def register_model_config(model_name: str) -> str:
    """``"path/to/Arch.json"`` -> register it with open_clip and return ``"Arch"``; any other
    name is returned unchanged."""
    if not model_name.endswith(".json"):
        return model_name
    path = Path(model_name).expanduser()
    if not path.is_file():
        raise ValueError(f"CLIP model config {model_name!r} not found")
    open_clip.add_model_config(path)
    return path.stem


def load_clip(
    model_name: str, checkpoint: str | None, device: str | torch.device = "cpu"
) -> LoadedClip:
    """Build an open_clip model without ever downloading.

    checkpoint:
      - ``None``: random weights (seeded, reproducible) and a loud warning: its masks and labels
        are meaningless, for tests only.
      - a file path: weights for the architecture ``model_name``.
      - ``"local-dir:/folder"``: an open_clip folder (``open_clip_config.json`` + weights);
        ``model_name`` is then ignored.
      - an open_clip pretrained tag of ``model_name`` (e.g. ``"laion2b_s34b_b88k"``): used only if
        its file is already in the local cache.
    model_name may also be the path of an open_clip model config JSON (``*.json``): it is
    registered with ``open_clip.add_model_config`` under its file stem (in this process, so every
    Ray worker that builds the proposer registers it too).
    Raises ``ValueError`` for anything else.
    """
    if checkpoint is None and is_shipped(model_name):  # a model the package ships, by name
        checkpoint = LOCAL_DIR_PREFIX + str(shipped_model(model_name).folder)  # sha256 checked
    model_name = register_model_config(model_name)
    common = {"device": device, "pretrained_image": False, "pretrained_text": False}
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    if checkpoint is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            model = open_clip.create_model(model_name, pretrained=None, **common)
        tokenizer_name, source = model_name, f"random init (seed {RANDOM_INIT_SEED})"
        logger.warning(
            "CLIP model %s has RANDOM weights (no checkpoint given): its masks, labels and "
            "embeddings are meaningless. Use this only for tests; pass a checkpoint for real runs.",
            model_name,
        )
    elif checkpoint.startswith(LOCAL_DIR_PREFIX):
        folder = Path(checkpoint[len(LOCAL_DIR_PREFIX) :]).expanduser()
        if not (folder / "open_clip_config.json").is_file() or not _has_weight_file(folder):
            raise ValueError(
                f"CLIP checkpoint {checkpoint!r}: folder needs open_clip_config.json and a "
                "*.safetensors/*.bin/*.pth weight file"
            )
        model = open_clip.create_model(checkpoint, **common)
        tokenizer_name, source = checkpoint, checkpoint
    elif os.path.isfile(checkpoint):
        model = open_clip.create_model(model_name, pretrained=checkpoint, **common)
        tokenizer_name, source = model_name, checkpoint
    else:
        tag_cfg = open_clip.get_pretrained_cfg(model_name, checkpoint)
        if not tag_cfg:
            raise ValueError(
                f"CLIP checkpoint {checkpoint!r} is not a file, a 'local-dir:' folder, or an "
                f"open_clip pretrained tag of {model_name!r}"
            )
        cached = _cached_tag_file(tag_cfg)
        if cached is None:
            raise ValueError(
                f"open_clip weights {model_name!r}/{checkpoint!r} are not in the local cache and "
                "uplvp never downloads: fetch the file yourself and pass its path as checkpoint"
            )
        mean, std = tag_cfg.get("mean"), tag_cfg.get("std")
        model = open_clip.create_model(
            model_name,
            pretrained=cached,
            force_quick_gelu=bool(tag_cfg.get("quick_gelu", False)),
            **common,
        )
        tokenizer_name, source = model_name, f"{checkpoint} ({cached})"
    model.eval()
    check_dense_support(model)
    preprocess = getattr(model.visual, "preprocess_cfg", {})
    return LoadedClip(
        model=model,
        tokenizer=open_clip.get_tokenizer(tokenizer_name),
        mean=tuple(float(v) for v in mean or preprocess.get("mean", open_clip.OPENAI_DATASET_MEAN)),
        std=tuple(float(v) for v in std or preprocess.get("std", open_clip.OPENAI_DATASET_STD)),
        pretrained=checkpoint is not None,
        model_key=f"{model_name}|{source}",
        source=source,
    )


def check_dense_support(model: torch.nn.Module) -> VisionTransformer:
    """The model's vision tower if dense features can be computed for it, else ``ValueError``
    (supported: open_clip ``VisionTransformer`` with standard blocks, token features, ``proj``)."""
    visual = getattr(model, "visual", model)
    if not isinstance(visual, VisionTransformer):
        raise ValueError(
            f"dense CLIP features need an open_clip ViT image tower, got {type(visual).__name__}"
        )
    if visual.attn_pool is not None or visual.proj is None:
        raise ValueError("dense CLIP features need a ViT with a projection and no attentional pool")
    if not all(isinstance(block, ResidualAttentionBlock) for block in visual.transformer.resblocks):
        raise ValueError("dense CLIP features need standard open_clip ResidualAttentionBlocks")
    if any(hasattr(block, "ln_1_kv") for block in visual.transformer.resblocks):
        raise ValueError("dense CLIP features do not support cross-attention blocks")
    return visual


def interpolate_positional_embedding(
    positional: torch.Tensor, grid: tuple[int, int], new_grid: tuple[int, int]
) -> torch.Tensor:
    """Positional embedding ``[1 + g_h * g_w, C]`` (class token first, patches row-major) for a
    ``new_grid`` patch grid: the patch part is resized bicubically (``align_corners=False``);
    returned unchanged when the grids are equal."""
    if tuple(new_grid) == tuple(grid):
        return positional
    class_pos, patch_pos = positional[:1], positional[1:]
    channels = positional.shape[1]
    patch_pos = patch_pos.reshape(1, grid[0], grid[1], channels).permute(0, 3, 1, 2).float()
    patch_pos = F.interpolate(patch_pos, size=tuple(new_grid), mode="bicubic", align_corners=False)
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(new_grid[0] * new_grid[1], channels)
    return torch.cat([class_pos, patch_pos.to(positional.dtype)])


def value_path(block: ResidualAttentionBlock, x: torch.Tensor) -> torch.Tensor:
    """MaskCLIP's last-block output: ``ls_1(out_proj(v_proj(ln_1(x))))`` with no q.k attention,
    no residual and no MLP. x: ``[..., width]`` tokens; returns the same shape."""
    attn = block.attn
    width = attn.embed_dim
    if attn.in_proj_weight is not None:
        v_weight = attn.in_proj_weight[2 * width :]
    else:
        v_weight = attn.v_proj_weight
    v_bias = attn.in_proj_bias[2 * width :] if attn.in_proj_bias is not None else None
    values = F.linear(block.ln_1(x), v_weight, v_bias)
    return block.ls_1(attn.out_proj(values))


DENSE_RECIPES = ("value", "tokens")


def dense_clip_features(model: torch.nn.Module, images: torch.Tensor,
                        recipe: str = "value") -> torch.Tensor:
    """Per-patch CLIP joint-space features (MaskCLIP recipe, see module docstring).

    ``recipe``: "value" (MaskCLIP: the last block's value path only) or "tokens" (the last
    block run as trained, attention, residual and MLP: the patch tokens as the model made them).

    model: an open_clip CLIP model (or its ``visual`` tower); images: float ``[B, 3, H, W]``
    normalised with the model's mean/std, H and W multiples of the patch size (any size: the
    positional embedding is interpolated). Returns float ``[B, E, H / p, W / p]``, each patch
    vector L2-normalised.
    """
    visual = check_dense_support(model)
    batch, _, height, width = images.shape
    patch_h, patch_w = visual.patch_size
    if height % patch_h or width % patch_w:
        raise ValueError(
            f"image size {height}x{width} is not a multiple of the patch size {patch_h}x{patch_w}"
        )
    grid = (height // patch_h, width // patch_w)
    dtype = visual.conv1.weight.dtype
    x = visual.conv1(images.to(dtype)).flatten(2).transpose(1, 2)  # [B, g_h * g_w, width]
    class_token = visual.class_embedding.to(x.dtype).expand(batch, 1, -1)
    positional = interpolate_positional_embedding(visual.positional_embedding, visual.grid_size, grid)
    x = visual.ln_pre(torch.cat([class_token, x], dim=1) + positional.to(x.dtype))
    transformer = visual.transformer
    if not transformer.batch_first:
        x = x.transpose(0, 1)
    if recipe not in DENSE_RECIPES:
        raise ValueError(f"dense recipe must be one of {DENSE_RECIPES}, got {recipe!r}")
    for block in transformer.resblocks[:-1]:
        x = block(x)
    last = transformer.resblocks[-1]
    x = value_path(last, x) if recipe == "value" else last(x)
    if not transformer.batch_first:
        x = x.transpose(0, 1)
    tokens = visual.ln_post(x[:, 1:]) @ visual.proj  # [B, g_h * g_w, E]
    tokens = F.normalize(tokens.float(), dim=-1)
    return tokens.transpose(1, 2).reshape(batch, -1, grid[0], grid[1])


@PROPOSERS.register("clip")
class ClipProposer:
    """The ``clip`` proposer: dense CLIP features vs. text embeddings of a vocabulary.

    Per image: letterbox to ``input_size``; per patch, class probabilities = softmax over
    (vocabulary + background words) of ``temperature x cosine(patch, text)``; vocabulary maps
    upsampled (bilinear) to the image; :func:`masks_from_probability_maps`; label = best class;
    embedding = the dense CLIP features averaged over the mask (joint space, ``[E]``).
    """

    name = "clip"

    def __init__(
        self,
        *,
        model_name: str = "ViT-B-16",
        checkpoint: str | None = None,
        device: str = "cpu",
        vocabulary: Sequence[str] = COCO_CLASSES,
        templates: Sequence[str] = PROMPT_TEMPLATES,
        background_words: Sequence[str] = BACKGROUND_WORDS,
        text_cache_file: str | None = None,
        input_size: int = 448,
        temperature: float = 100.0,
        threshold: float = 0.5,
        min_peak: float = 0.8,
        min_area: int = 32,
        max_area_fraction: float = 0.95,
        nms_iou: float = 0.5,
        top_k: int = 20,
        text_cache: TextEmbeddingCache = TEXT_EMBEDDING_CACHE,
        random_weights: bool = False,
        dense_recipe: str = "value",
    ) -> None:
        for name, value in (("threshold", threshold), ("min_peak", min_peak),
                            ("max_area_fraction", max_area_fraction)):
            if not 0 < value <= 1:
                raise ValueError(f"clip proposer option {name} must be in (0, 1], got {value}")
        if temperature <= 0:
            raise ValueError(f"clip proposer option temperature must be > 0, got {temperature}")
        if dense_recipe not in DENSE_RECIPES:
            raise ValueError(f"clip proposer option dense_recipe must be one of {DENSE_RECIPES}, "
                             f"got {dense_recipe!r}")
        if checkpoint is None and not random_weights and not is_shipped(model_name):
            raise ValueError(
                "no CLIP checkpoint given: random weights give meaningless masks; pass a "
                "checkpoint, or random_weights=True for a speed or test run"
            )
        self.vocabulary = check_vocabulary(vocabulary)
        self.templates = check_templates(templates)
        self.background_words = [w for w in background_words if w not in self.vocabulary]
        self.clip = load_clip(model_name, checkpoint, device)
        visual = check_dense_support(self.clip.model)
        self.patch_size = int(visual.patch_size[0])
        if input_size % self.patch_size or visual.patch_size[0] != visual.patch_size[1]:
            raise ValueError(
                f"input_size {input_size} must be a multiple of the square patch size "
                f"{visual.patch_size}"
            )
        self.embedding_dim = int(visual.output_dim)
        self._settings = {
            "model_name": model_name,
            "checkpoint": checkpoint,
            "input_size": input_size,
            "temperature": temperature,
            "threshold": threshold,
            "min_peak": min_peak,
            "min_area": min_area,
            "max_area_fraction": max_area_fraction,
            "nms_iou": nms_iou,
            "top_k": top_k,
            "dense_recipe": dense_recipe,
        }
        self.device = torch.device(device)
        text = text_cache.get(
            self.clip.model,
            self.clip.tokenizer,
            self.clip.model_key,
            self.vocabulary + self.background_words,
            self.templates,
            cache_file=text_cache_file,
        )
        self._text = text.to(self.device)  # [K + K_bg, E]

    def config(self) -> dict[str, Any]:
        """Every setting that changes the output (JSON-serialisable)."""
        return {
            "proposer": self.name,
            **self._settings,
            "pretrained": self.clip.pretrained,
            "vocabulary": list(self.vocabulary),
            "templates": list(self.templates),
            "background_words": list(self.background_words),
        }

    @torch.inference_mode()
    def propose(self, images: list[np.ndarray]) -> list[list[ProposedMask]]:
        """Masks per image (uint8 ``[H, W, 3]`` RGB in), sorted by score descending."""
        if not images:
            return []
        size = self._settings["input_size"]
        canvas, boxes = letterbox_batch(images, size, self.clip.mean, self.clip.std)
        features = dense_clip_features(self.clip.model, torch.from_numpy(canvas).to(self.device),
                                       self._settings["dense_recipe"])
        logits = self._settings["temperature"] * torch.einsum("ke,behw->bkhw", self._text, features)
        probabilities = logits.softmax(dim=1)[:, : len(self.vocabulary)]  # [B, K, g, g]
        return [
            self._image_masks(probabilities[i], features[i], box) for i, box in enumerate(boxes)
        ]

    def _image_masks(
        self, probabilities: torch.Tensor, features: torch.Tensor, box: Letterbox
    ) -> list[ProposedMask]:
        """Masks of one image from its patch probabilities ``[K, g, g]`` and features ``[E, g, g]``."""
        s = self._settings
        p = self.patch_size
        valid_h, valid_w = math.ceil(box.scaled_height / p), math.ceil(box.scaled_width / p)
        probabilities = probabilities[:, :valid_h, :valid_w]
        classes = torch.nonzero(probabilities.amax(dim=(1, 2)) >= s["min_peak"]).flatten()
        if len(classes) == 0:
            return []
        grid_hw = (valid_h * p, valid_w * p)
        maps = F.interpolate(probabilities[classes][None], size=grid_hw, mode="bilinear")
        maps = maps[:, :, : box.scaled_height, : box.scaled_width]
        maps = F.interpolate(maps, size=(box.height, box.width), mode="bilinear")[0]
        candidates = masks_from_probability_maps(
            maps.cpu().numpy(),
            threshold=s["threshold"],
            min_peak=s["min_peak"],
            min_area=s["min_area"],
            max_area_fraction=s["max_area_fraction"],
            nms_iou=s["nms_iou"],
            top_k=s["top_k"],
        )
        dense = features[:, :valid_h, :valid_w].cpu().numpy()
        results = []
        for candidate in candidates:
            label_index = int(classes[candidate.class_index])
            weights = mask_to_canvas(candidate.mask, box, (valid_h * p, valid_w * p))
            results.append(
                ProposedMask(
                    mask=candidate.mask,
                    score=float(candidate.score),
                    label=self.vocabulary[label_index],
                    label_index=label_index,
                    embedding=mask_pooled_embedding(dense, weights),
                )
            )
        return results

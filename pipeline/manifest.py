"""Dataset manifests: one YAML file names a set of images and, for labeled sets, its COCO JSON.

Format (``format_version: 1``; full description in ``docs/manifests.md``)::

    format_version: 1
    name: synth-train
    images:
      root: train/images          # relative paths resolve against the manifest's folder
      glob: "*.png"               # or `list: [a.png, b/c.jpg]` or `list_file: images.txt`
    annotations: train/annotations.json   # optional COCO instances JSON
    categories:                   # optional: override category names / order
      - {id: 1, name: disk}
    allow_outside_root: false     # image paths may not escape images.root unless true

``load_manifest`` validates everything the stages rely on and returns a :class:`Dataset`; any
problem raises one :class:`~pipeline.errors.InputError` line naming the file and the field.
"""
from __future__ import annotations

import builtins
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from pipeline.coco import load_coco
from pipeline.errors import InputError

MANIFEST_FORMAT_VERSION = 1
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class ImagesSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    root: str
    glob: str | None = None
    list: builtins.list[str] | None = None  # field named as in the YAML
    list_file: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> "ImagesSpec":
        given = [k for k in ("glob", "list", "list_file") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give only one of glob / list / list_file, got {', '.join(given)}")
        return self


class CategorySpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: int
    name: str
    supercategory: str | None = None


class ManifestSpec(BaseModel):
    """The YAML document as written by the user (paths not yet resolved)."""

    model_config = ConfigDict(extra="forbid")

    format_version: int = MANIFEST_FORMAT_VERSION
    name: str
    images: ImagesSpec
    annotations: str | None = None
    categories: list[CategorySpec] | None = None
    allow_outside_root: bool = False


@dataclass(frozen=True)
class ImageRecord:
    """One image of a dataset. ``image_id`` is the COCO id, or the 1-based position in the
    sorted file list for unlabeled sets. ``file_name`` is relative to the dataset root."""

    image_id: int
    file_name: str
    path: Path
    height: int | None = None
    width: int | None = None


@dataclass
class Dataset:
    """A loaded, validated manifest: images sorted by ``file_name``; ``coco`` for labeled sets."""

    name: str
    manifest_path: Path
    root: Path
    images: list[ImageRecord]
    coco: dict | None = None
    categories: list[dict] = field(default_factory=list)
    annotations_path: Path | None = None

    @property
    def labeled(self) -> bool:
        return self.coco is not None


def load_manifest(path: str | Path) -> Dataset:
    """Read, validate and resolve a manifest YAML file into a :class:`Dataset`."""
    path = Path(path)
    spec = _read_spec(path)
    base = path.resolve().parent
    root = _resolve(base, spec.images.root)
    if not root.is_dir():
        raise InputError(f"images.root: folder not found: {root}", path)

    listed = _list_images(spec, root, base, path)
    if spec.annotations is None:
        if spec.images.glob is None and spec.images.list is None and spec.images.list_file is None:
            raise InputError("images: give glob, list or list_file (or annotations)", path)
        if not listed:
            raise InputError(f"images: no images matched under {root}", path)
        images = [
            ImageRecord(image_id=i + 1, file_name=name, path=root / name)
            for i, name in enumerate(listed)
        ]
        categories = [c.model_dump(exclude_none=True) for c in spec.categories or []]
        return Dataset(spec.name, path, root, images, None, categories)

    ann_path = _resolve(base, spec.annotations)
    coco = load_coco(ann_path)
    if spec.categories is not None:
        coco = _override_categories(coco, spec.categories, path)
    listed_set = set(listed) if listed is not None else None
    images = []
    for img in sorted(coco["images"], key=lambda im: im["file_name"]):
        name = img["file_name"]
        _check_inside_root(root, name, spec.allow_outside_root, path, f"{ann_path.name} file_name")
        if not (root / name).is_file():
            raise InputError(
                f"annotations: image file of id {img['id']} not found: {root / name}", path
            )
        if listed_set is not None and name not in listed_set:
            raise InputError(
                f"annotations: image '{name}' (id {img['id']}) is not matched by images "
                f"glob/list", path
            )
        images.append(ImageRecord(img["id"], name, root / name, img["height"], img["width"]))
    if not images:
        raise InputError(f"annotations: {ann_path} lists no images", path)
    return Dataset(spec.name, path, root, images, coco, list(coco["categories"]), ann_path)


def write_manifest(
    path: str | Path,
    name: str,
    images_root: str | Path,
    *,
    glob: str | None = None,
    annotations: str | Path | None = None,
) -> None:
    """Write a manifest YAML; paths are stored relative to the manifest's folder when possible."""
    from pipeline.atomic import write_text_atomic

    path = Path(path)
    base = path.resolve().parent
    doc: dict[str, Any] = {
        "format_version": MANIFEST_FORMAT_VERSION,
        "name": name,
        "images": {"root": _relative(base, images_root)},
    }
    if glob is not None:
        doc["images"]["glob"] = glob
    if annotations is not None:
        doc["annotations"] = _relative(base, annotations)
    write_text_atomic(path, yaml.safe_dump(doc, sort_keys=False))


# --------------------------------------------------------------------------- helpers


def _read_spec(path: Path) -> ManifestSpec:
    if not path.is_file():
        raise InputError("manifest file not found", path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise InputError(f"not valid YAML{where}", path) from None
    except UnicodeDecodeError:
        raise InputError("not a UTF-8 text file", path) from None
    if not isinstance(raw, dict):
        raise InputError("a manifest must be a YAML mapping (name, images, ...)", path)
    version = raw.get("format_version", MANIFEST_FORMAT_VERSION)
    if version != MANIFEST_FORMAT_VERSION:
        raise InputError(
            f"format_version: {version!r} is not supported (this uplvp reads "
            f"{MANIFEST_FORMAT_VERSION})",
            path,
        )
    try:
        return ManifestSpec.model_validate(raw)
    except ValidationError as err:
        raise InputError(first_validation_error(err), path) from None


def first_validation_error(err: ValidationError) -> str:
    """One line from a pydantic error: ``field.sub: message`` (plus a count if more)."""
    errors = err.errors()
    first = errors[0]
    loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
    msg = first["msg"]
    if first["type"] == "missing":
        msg = "required field is missing"
    elif first["type"] == "extra_forbidden":
        msg = "unknown field"
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return f"{loc}: {msg}{more}"


def _resolve(base: Path, p: str | Path) -> Path:
    p = Path(os.path.expanduser(str(p)))
    return p if p.is_absolute() else (base / p)


def _relative(base: Path, p: str | Path) -> str:
    p = Path(p).resolve()
    try:
        return os.path.relpath(p, base)
    except ValueError:  # different drive (Windows)
        return str(p)


def _check_inside_root(root: Path, name: str, allowed: bool, path: Path, field_name: str) -> None:
    if allowed:
        return
    if Path(name).is_absolute() or ".." in Path(name).parts:
        raise InputError(
            f"{field_name}: '{name}' escapes images.root (set allow_outside_root: true to allow)",
            path,
        )


def _list_images(spec: ManifestSpec, root: Path, base: Path, path: Path) -> list[str] | None:
    """Sorted file names relative to root, or None when the manifest gives no glob/list."""
    imgs = spec.images
    if imgs.glob is not None:
        if Path(imgs.glob).is_absolute():
            raise InputError(f"images.glob: '{imgs.glob}' must be a pattern relative to "
                             "images.root", path)
        # A '..' in the pattern would match files outside the root.
        _check_inside_root(root, imgs.glob, spec.allow_outside_root, path, "images.glob")
        names = sorted(
            Path(os.path.relpath(p, root)).as_posix()
            for p in root.glob(imgs.glob)
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        return names
    entries: list[str] | None = None
    field_name = "images.list"
    if imgs.list is not None:
        entries = list(imgs.list)
    elif imgs.list_file is not None:
        field_name = "images.list_file"
        list_path = _resolve(base, imgs.list_file)
        if not list_path.is_file():
            raise InputError(f"images.list_file: file not found: {list_path}", path)
        entries = [
            line.strip()
            for line in list_path.read_text(encoding="utf-8").splitlines()
            if line.strip() and not line.lstrip().startswith("#")
        ]
    if entries is None:
        return None
    seen: set[str] = set()
    for name in entries:
        _check_inside_root(root, name, spec.allow_outside_root, path, field_name)
        if name in seen:
            raise InputError(f"{field_name}: '{name}' is listed twice", path)
        seen.add(name)
        if not (root / name).is_file():
            raise InputError(f"{field_name}: image not found: {root / name}", path)
    return sorted(entries)


def _override_categories(coco: dict, cats: list[CategorySpec], path: Path) -> dict:
    ids = [c.id for c in cats]
    if len(set(ids)) != len(ids):
        raise InputError("categories: duplicate category id", path)
    used = {a["category_id"] for a in coco["annotations"]}
    missing = sorted(used - set(ids))
    if missing:
        raise InputError(
            f"categories: override lacks category id(s) {missing} used by the annotations", path
        )
    coco = dict(coco)
    coco["categories"] = [c.model_dump(exclude_none=True) for c in cats]
    return coco

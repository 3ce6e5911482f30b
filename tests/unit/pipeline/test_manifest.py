import json

import pytest

from pipeline.errors import InputError
from pipeline.manifest import load_manifest, write_manifest
from tests.helpers import write_image


def _write(path, text):
    path.write_text(text)
    return path


def test_labeled_manifest_loads_sorted_images_with_coco_ids(tiny_coco):
    ds = load_manifest(tiny_coco["manifest"])
    assert ds.labeled and ds.name == "tiny"
    assert [im.file_name for im in ds.images] == sorted(f"img_{i:02d}.png" for i in range(1, 11))
    assert ds.images[0].image_id == 1 and ds.images[0].height == 24 and ds.images[0].width == 32
    assert ds.images[0].path.is_file()
    assert [c["name"] for c in ds.categories] == ["box", "other"]


def test_unlabeled_manifest_by_glob_list_and_list_file(tmp_path):
    for name in ("b.png", "a.jpg", "sub/c.png", "notes.txt"):
        write_image(tmp_path / "imgs" / name, 4, 4) if name.endswith(("png", "jpg")) else (
            tmp_path / "imgs" / name
        ).write_text("x")
    m = _write(tmp_path / "u.yaml", "name: u\nimages: {root: imgs, glob: '**/*'}\n")
    ds = load_manifest(m)
    assert [im.file_name for im in ds.images] == ["a.jpg", "b.png", "sub/c.png"]
    assert [im.image_id for im in ds.images] == [1, 2, 3]
    assert not ds.labeled

    m2 = _write(tmp_path / "l.yaml", "name: l\nimages: {root: imgs, list: [sub/c.png, b.png]}\n")
    assert [im.file_name for im in load_manifest(m2).images] == ["b.png", "sub/c.png"]

    (tmp_path / "list.txt").write_text("# comment\nb.png\n\na.jpg\n")
    m3 = _write(tmp_path / "f.yaml", "name: f\nimages: {root: imgs, list_file: list.txt}\n")
    assert [im.file_name for im in load_manifest(m3).images] == ["a.jpg", "b.png"]


def test_write_manifest_round_trips_with_relative_paths(tiny_coco):
    out = tiny_coco["dir"] / "sub" / "again.yaml"
    out.parent.mkdir()
    write_manifest(out, "again", tiny_coco["root"], annotations=tiny_coco["annotations"])
    text = out.read_text()
    assert "root: ../images" in text and "annotations: ../instances_train.json" in text
    assert len(load_manifest(out).images) == 10


@pytest.mark.parametrize(
    "body, message",
    [
        ("name: x\nimages: {root: nowhere, glob: '*.png'}\n", "images.root: folder not found"),
        ("name: x\nimages: {root: images, glob: '*.jpg'}\n", "images: no images matched"),
        ("images: {root: images, glob: '*.png'}\n", "name: required field is missing"),
        ("name: x\nimages: {glob: '*.png'}\n", "images.root: required field is missing"),
        ("name: x\nimages: {root: images, glob: '*.png', list: [a]}\n", "only one of glob"),
        ("name: x\nimages: {root: images, glob: '*.png'}\nimage: 1\n", "image: unknown field"),
        ("name: x\nformat_version: 9\nimages: {root: images}\n", "format_version: 9"),
        ("name: [x\n", "not valid YAML at line"),
        ("- just a list\n", "must be a YAML mapping"),
        ("name: x\nimages: {root: images, list: [../secret.png]}\n", "escapes images.root"),
        ("name: x\nimages: {root: images, list: [missing.png]}\n", "image not found"),
        (
            "name: x\nimages: {root: images, glob: '*.png'}\nannotations: nope.json\n",
            "COCO annotations file not found",
        ),
    ],
)
def test_bad_manifests_fail_with_one_line_naming_file_and_field(tiny_coco, body, message):
    path = _write(tiny_coco["dir"] / "bad.yaml", body)
    with pytest.raises(InputError) as info:
        load_manifest(path)
    text = str(info.value)
    assert message in text, text
    assert "\n" not in text
    assert "bad.yaml" in text or "nope.json" in text


def test_annotation_image_missing_on_disk_is_reported(tiny_coco):
    (tiny_coco["root"] / "img_03.png").unlink()
    with pytest.raises(InputError, match="image file of id 3 not found"):
        load_manifest(tiny_coco["manifest"])


def test_coco_file_name_outside_glob_is_reported(tiny_coco):
    coco = json.loads(tiny_coco["annotations"].read_text())
    coco["images"][0]["file_name"] = "other.jpg"
    write_image(tiny_coco["root"] / "other.jpg", 24, 32)
    tiny_coco["annotations"].write_text(json.dumps(coco))
    with pytest.raises(InputError, match="'other.jpg' .* not matched by images glob"):
        load_manifest(tiny_coco["manifest"])


def test_category_override_renames_and_must_cover_used_ids(tiny_coco):
    base = tiny_coco["manifest"].read_text()
    ok = _write(
        tiny_coco["dir"] / "ok.yaml",
        base + "categories:\n  - {id: 1, name: square}\n  - {id: 2, name: bar}\n",
    )
    assert [c["name"] for c in load_manifest(ok).categories] == ["square", "bar"]
    bad = _write(tiny_coco["dir"] / "bad.yaml", base + "categories:\n  - {id: 1, name: square}\n")
    with pytest.raises(InputError, match=r"lacks category id\(s\) \[2\]"):
        load_manifest(bad)

import json

import pandas as pd
import pyarrow.parquet as pq
import pytest

from pipeline.errors import InputError
from pipeline.shards import (
    IMAGES_SCHEMA,
    MASKS_SCHEMA,
    SHARD_FORMAT_VERSION,
    array_task_shards,
    parse_shard_list,
    plan_shards,
    read_metadata,
    shard_file,
    shard_status,
    validate_shard_file,
    write_shard,
)
from tests.helpers import REPO


def test_plan_shards_fixed_boundaries():
    shards = plan_shards(10, 4)
    assert [(s.index, s.start, s.stop) for s in shards] == [(0, 0, 4), (1, 4, 8), (2, 8, 10)]
    assert plan_shards(0, 4) == []
    with pytest.raises(InputError, match="--shard-size"):
        plan_shards(3, 0)


def test_parse_shard_list():
    assert parse_shard_list("0,3-5", 8) == [0, 3, 4, 5]
    assert parse_shard_list(" 5, 1,1 ", 8) == [1, 5]
    for bad, msg in [("x", "not an index"), ("5-3", "empty"), ("9", "out of range"), ("", "no shard")]:
        with pytest.raises(InputError, match=msg):
            parse_shard_list(bad, 8)


def test_array_task_shards_partition_all_shards():
    parts = [array_task_shards(i, 3, 8) for i in range(3)]
    assert parts == [[0, 3, 6], [1, 4, 7], [2, 5]]
    assert sorted(sum(parts, [])) == list(range(8))
    with pytest.raises(InputError, match="--shard-index 3"):
        array_task_shards(3, 3, 8)


def _rows():
    mask = {
        "image_id": 1, "image_path": "/x/a.png", "height": 4, "width": 5, "mask_index": 0,
        "rle_counts": b"abc", "bbox": [0.0, 1.0, 2.0, 3.0], "area": 6, "score": 0.5,
        "label": "object", "label_index": 0, "clip_embedding": [0.6, 0.8],
        "shape_grid": b"\x01\x02",
    }
    image = {"image_id": 1, "image_path": "/x/a.png", "height": 4, "width": 5, "status": "ok",
             "error": "", "num_masks": 1}
    return [mask], [image]


def test_write_shard_then_complete_and_pandas_reads_folder(tmp_path):
    masks, images = _rows()
    assert shard_status(tmp_path, 0, "h1") == "missing"
    write_shard(tmp_path, 0, masks, images, "h1")
    write_shard(tmp_path, 1, [], images, "h1")
    assert shard_status(tmp_path, 0, "h1") == "complete"
    assert shard_status(tmp_path, 0, "other") == "stale"
    meta = read_metadata(shard_file(tmp_path, "masks", 0))
    assert meta == {"format_version": SHARD_FORMAT_VERSION, "config_hash": "h1",
                    "shard_index": 0, "num_images": 1, "num_images_ok": 1,
                    "num_images_error": 0, "num_masks": 1}
    df = pd.read_parquet(tmp_path / "masks")
    assert len(df) == 1 and list(df.columns) == MASKS_SCHEMA.names
    assert pq.read_schema(shard_file(tmp_path, "masks", 1)).equals(MASKS_SCHEMA, check_metadata=False)
    assert validate_shard_file(shard_file(tmp_path, "images", 0), IMAGES_SCHEMA)["config_hash"] == "h1"
    assert not list(tmp_path.rglob(".tmp-*"))


def test_half_written_shard_is_not_complete(tmp_path):
    masks, images = _rows()
    write_shard(tmp_path, 0, masks, images, "h1")
    shard_file(tmp_path, "images", 0).unlink()  # killed between the two files
    assert shard_status(tmp_path, 0, "h1") == "missing"


def test_truncated_or_foreign_shard_is_stale_and_rejected(tmp_path):
    masks, images = _rows()
    write_shard(tmp_path, 0, masks, images, "h1")
    path = shard_file(tmp_path, "images", 0)
    path.write_bytes(path.read_bytes()[:50])
    assert shard_status(tmp_path, 0, "h1") == "stale"
    with pytest.raises(InputError, match="not a readable Parquet file"):
        validate_shard_file(path, IMAGES_SCHEMA)
    foreign = tmp_path / "foreign.parquet"
    pd.DataFrame({"a": [1]}).to_parquet(foreign)
    with pytest.raises(InputError, match="no uplvp shard metadata"):
        read_metadata(foreign)


def test_other_format_version_is_rejected(tmp_path):
    masks, images = _rows()
    write_shard(tmp_path, 0, masks, images, "h1")
    path = shard_file(tmp_path, "images", 0)
    table = pq.read_table(path)
    meta = {b"uplvp": json.dumps({"format_version": 99, "config_hash": "h1", "shard_index": 0}).encode()}
    pq.write_table(table.replace_schema_metadata(meta), path)
    assert shard_status(tmp_path, 0, "h1") == "stale"
    with pytest.raises(InputError, match="format_version 99 is not supported"):
        validate_shard_file(path, IMAGES_SCHEMA)


def _documented_columns(section: str) -> list[tuple[str, str]]:

    text = (REPO / "docs" / "shards.md").read_text()
    body = text.split(f"## `{section}/` columns")[1].split("\n## ")[0]
    rows = [line.split("|")[1:3] for line in body.splitlines() if line.startswith("| `")]
    return [(name.strip().strip("`"), typ.strip()) for name, typ in rows]


@pytest.mark.parametrize("section, schema", [("masks", MASKS_SCHEMA), ("images", IMAGES_SCHEMA)])
def test_schema_matches_the_docs(section, schema):
    assert _documented_columns(section) == [(f.name, str(f.type)) for f in schema]


def test_dataset_totals_from_footer_counts_and_from_columns_without_them(tmp_path):
    from stages.propose import dataset_totals

    masks, images = _rows()
    failed = {**images[0], "image_id": 2, "status": "error", "error": "truncated", "num_masks": 0}
    write_shard(tmp_path, 0, masks, [images[0], failed], "h1")
    write_shard(tmp_path, 1, masks * 3, [{**images[0], "num_masks": 3}], "h1")
    expected = {"shards_on_disk": 2, "images_ok": 2, "images_error": 1, "masks": 4,
                "masks_per_image": 2.0}
    assert dataset_totals(tmp_path, 3) == expected
    # a shard written before the counts existed: its footer lacks them, the columns are read
    path = shard_file(tmp_path, "images", 1)
    table = pq.read_table(path)
    old = {k: v for k, v in read_metadata(path).items() if not k.startswith("num_") or k == "num_images"}
    pq.write_table(table.replace_schema_metadata({"uplvp": json.dumps(old)}), path)
    assert "num_masks" not in read_metadata(path)
    assert dataset_totals(tmp_path, 3) == expected

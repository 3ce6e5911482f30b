import pytest

from pipeline.errors import InputError
from pipeline.splits import format_percent, sample_subsets, subset_coco, subset_size


def test_subset_size_rounds_half_up_with_at_least_one():
    assert subset_size(1000, 1) == 10
    assert subset_size(60, 5) == 3
    assert subset_size(10, 5) == 1  # 0.5 rounds up
    assert subset_size(10, 1) == 1  # never empty
    assert subset_size(10, 100) == 10
    assert subset_size(118287, 1) == 1183


def test_same_seed_same_subsets_and_nested():
    ids = list(range(1, 201))
    a = sample_subsets(ids, [1, 5, 10], seed=1)
    b = sample_subsets(list(reversed(ids)), [10, 1], seed=1)
    assert a[0].image_ids == b[1].image_ids and a[2].image_ids == b[0].image_ids
    assert [len(s.image_ids) for s in a] == [2, 10, 20]
    assert set(a[0].image_ids) <= set(a[1].image_ids) <= set(a[2].image_ids)
    c = sample_subsets(ids, [10], seed=2)
    assert c[0].image_ids != a[2].image_ids


def test_bad_percent_is_input_error():
    with pytest.raises(InputError, match="must be in"):
        sample_subsets([1, 2], [0], seed=1)
    with pytest.raises(InputError, match="must be in"):
        sample_subsets([1, 2], [150], seed=1)


def test_subset_coco_keeps_only_chosen_images_and_their_annotations(tiny_coco):
    sub = subset_coco(tiny_coco["coco"], [2, 5])
    assert [im["id"] for im in sub["images"]] == [2, 5]
    assert {a["image_id"] for a in sub["annotations"]} == {2, 5}
    assert len(sub["annotations"]) == 1 + 2  # image 2: one box; image 5: two
    assert sub["categories"] == tiny_coco["coco"]["categories"]


def test_format_percent():
    assert format_percent(1.0) == "1" and format_percent(0.5) == "0.5"

"""Post-processing of model outputs into COCO results: exact values on tiny hand-made tensors."""
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from pipeline.evaluation.postprocess import (
    batch_to_coco_results,
    check_category_ids,
    instances_to_coco,
    mask_scores,
    postprocess_image,
    resize_masks,
    select_candidates,
    valid_mask_region,
)

BIG = 10.0  # a mask logit with sigmoid ~ 1


def logits_for(probs: list[list[float]]) -> torch.Tensor:
    """Class logits whose softmax is exactly ``probs`` (rows sum to 1, last = no object)."""
    return torch.tensor(probs, dtype=torch.float64).log().float()


def test_mask_scores_mean_sigmoid_inside_binarised_mask():
    logits = torch.tensor([
        [[0.0, 2.0], [-1.0, 1.0]],     # inside: 2.0 and 1.0 (0.0 is not > 0)
        [[-3.0, -1.0], [-2.0, -5.0]],  # empty mask -> 0
    ])
    expected = (torch.sigmoid(torch.tensor(2.0)) + torch.sigmoid(torch.tensor(1.0))) / 2
    scores = mask_scores(logits)
    assert scores[0].item() == pytest.approx(expected.item(), abs=1e-7)
    assert scores[1].item() == 0.0


def test_valid_mask_region_rounds_up():
    # padded 64x96, masks at stride 4 (16x24), valid image 30x50 -> ceil(7.5)=8, ceil(12.5)=13
    assert valid_mask_region((64, 96), (16, 24), (30, 50)) == (8, 13)
    assert valid_mask_region((64, 96), (16, 24), (64, 96)) == (16, 24)


def test_select_candidates_ranks_class_prob_times_mask_score_over_all_pairs():
    # 3 kernels, 2 classes (+ no object); all masks fully "on" with logit BIG so mask score = s
    s = torch.sigmoid(torch.tensor(BIG)).item()
    probs = [[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.05, 0.05, 0.9]]
    masks = torch.full((3, 2, 2), BIG)
    scores, labels, kernels = select_candidates(logits_for(probs), masks, max_detections=4)
    assert kernels.tolist() == [1, 0, 0, 1]
    assert labels.tolist() == [1, 0, 1, 0]
    assert scores.tolist() == pytest.approx([0.7 * s, 0.6 * s, 0.3 * s, 0.2 * s], abs=1e-6)


def test_select_candidates_mask_score_changes_order_and_ties_are_stable():
    probs = [[0.5, 0.5, 0.0 + 1e-12], [0.8, 0.1, 0.1]]
    masks = torch.stack([torch.full((2, 2), BIG), torch.full((2, 2), -BIG)])  # kernel 1 empty
    scores, labels, kernels = select_candidates(logits_for(probs), masks, max_detections=10)
    # kernel 0: two equal scores (class 0 then class 1); kernel 1: score 0 (empty mask)
    assert kernels.tolist() == [0, 0, 1, 1]
    assert labels.tolist() == [0, 1, 0, 1]
    assert scores[2:].tolist() == [0.0, 0.0]


def test_select_candidates_rejects_bad_shapes():
    with pytest.raises(ValueError, match="pred_logits"):
        select_candidates(torch.zeros(3, 1), torch.zeros(3, 2, 2), 5)
    with pytest.raises(ValueError, match="mask logits"):
        select_candidates(torch.zeros(3, 2), torch.zeros(2, 2, 2), 5)
    with pytest.raises(ValueError, match="max_detections"):
        select_candidates(torch.zeros(3, 2), torch.zeros(3, 2, 2), 0)


def test_resize_masks_crops_valid_region_then_resizes_to_original():
    # padded 8x8 input whose top half (4x8) is the image; masks at stride 2 (4x4).
    # The mask is "on" in the left half (all rows) and in the right half of padding row 3:
    # after cropping, exactly the left half of the image is on; without the crop the padding
    # would show up in the bottom right of the original.
    logits = torch.full((1, 4, 4), -BIG)
    logits[0, :, :2] = BIG
    logits[0, 3, 2:] = BIG
    masks = resize_masks(logits, (8, 8), (4, 8), (8, 16))
    assert masks.dtype == torch.bool and masks.shape == (1, 8, 16)
    expected = np.zeros((8, 16), dtype=bool)
    expected[:, :8] = True
    assert np.array_equal(masks[0].numpy(), expected)


def test_resize_masks_bilinear_edge_position():
    # one "on" cell at stride 2 -> 8x8: bilinear (align_corners=False) puts the 0-crossing
    # half a mask cell outside the cell's centre, i.e. the 2x2 block grows to rows/cols 0..3
    logits = torch.full((1, 4, 4), -BIG)
    logits[0, :2, 0] = BIG
    masks = resize_masks(logits, (8, 8), (8, 8), (8, 8))
    expected = np.zeros((8, 8), dtype=bool)
    expected[:4, :2] = True
    assert np.array_equal(masks[0].numpy(), expected)


def test_resize_masks_chunks_match_one_pass(monkeypatch):
    import pipeline.evaluation.postprocess as predictions

    torch.manual_seed(0)
    logits = torch.randn(5, 4, 4) * 3
    full = resize_masks(logits, (16, 16), (13, 11), (7, 9))
    monkeypatch.setattr(predictions, "RESIZE_CHUNK", 2)
    assert torch.equal(predictions.resize_masks(logits, (16, 16), (13, 11), (7, 9)), full)


def test_postprocess_image_threshold_topk_and_empty_masks():
    # 3 kernels, 1 class. kernel 0: p=0.9, a 2x2 block; kernel 1: p=0.6, mask only in the
    # padding (its valid-region mask score is 0); kernel 2: p=0.3, whole valid region.
    probs = [[0.9, 0.1], [0.6, 0.4], [0.3, 0.7]]
    masks = torch.full((3, 4, 4), -BIG)
    masks[0, :2, :2] = BIG
    masks[1, 3, 3] = BIG
    masks[2, :2, :3] = BIG
    s = torch.sigmoid(torch.tensor(BIG)).item()
    inst = postprocess_image(logits_for(probs), masks, (8, 8), (4, 6), (4, 6),
                             max_detections=100, score_threshold=0.0)
    assert inst.labels.tolist() == [0, 0]
    assert inst.scores.tolist() == pytest.approx([0.9 * s, 0.3 * s], abs=1e-6)
    assert inst.masks.shape == (2, 4, 6)
    assert inst.masks[1].all()  # kernel 2 covers the whole valid image
    expected0 = np.zeros((4, 6), dtype=bool)
    expected0[:4, :4] = True  # 2x2 cells at stride 2 -> a 4x4 block
    assert np.array_equal(inst.masks[0].numpy(), expected0)

    top1 = postprocess_image(logits_for(probs), masks, (8, 8), (4, 6), (4, 6), max_detections=1)
    assert top1.scores.tolist() == pytest.approx([0.9 * s], abs=1e-6)
    high = postprocess_image(logits_for(probs), masks, (8, 8), (4, 6), (4, 6),
                             score_threshold=0.5)
    assert high.scores.shape == (1,)


def test_postprocess_image_rejects_image_larger_than_padding():
    with pytest.raises(ValueError, match="exceeds the padded size"):
        postprocess_image(torch.zeros(2, 2), torch.zeros(2, 4, 4), (8, 8), (9, 8), (9, 8))


def test_instances_to_coco_maps_category_ids_and_encodes_rle_and_bbox():
    probs = [[0.1, 0.8, 0.1], [0.7, 0.2, 0.1]]
    masks = torch.full((2, 4, 4), -BIG)
    masks[0, 1:3, 0:2] = BIG
    masks[1, 0, 3] = BIG
    inst = postprocess_image(logits_for(probs), masks, (8, 8), (8, 8), (8, 8))
    results = instances_to_coco(inst, image_id=42, category_ids=[3, 17])
    # scores 0.8 (kernel 0, class 1), 0.7 (kernel 1, class 0), 0.2 (1, 1), 0.1 (0, 0), times
    # the mask score; class 1 -> category 17, class 0 -> category 3
    assert [r["category_id"] for r in results] == [17, 3, 17, 3]
    assert all(r["image_id"] == 42 for r in results)
    for res, mask in zip(results, inst.masks):
        assert isinstance(res["segmentation"]["counts"], str)
        assert res["segmentation"]["size"] == [8, 8]
        decoded = mask_utils.decode({"size": [8, 8],
                                     "counts": res["segmentation"]["counts"].encode()})
        assert np.array_equal(decoded.astype(bool), mask.numpy())
        ys, xs = np.nonzero(decoded)
        assert res["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1,
                               ys.max() - ys.min() + 1]
    assert results[0]["score"] > results[1]["score"]


def test_batch_to_coco_results_per_image_sizes_and_ids():
    # two images padded to 8x16; image 0 valid 8x8 (orig 16x16), image 1 valid 4x16 (orig 2x8)
    probs = [[[0.9, 0.1]], [[0.8, 0.2]]]
    logits = torch.tensor(probs).log()
    masks = torch.full((2, 1, 4, 8), BIG)
    outputs = {"pred_logits": logits, "pred_masks": masks}
    batch = {"images": torch.zeros(2, 3, 8, 16), "image_ids": [7, 9],
             "image_sizes": [(8, 8), (4, 16)], "orig_sizes": [(16, 16), (2, 8)]}
    results = batch_to_coco_results(outputs, batch, category_ids=[5])
    assert [r["image_id"] for r in results] == [7, 9]
    assert [r["segmentation"]["size"] for r in results] == [[16, 16], [2, 8]]
    assert [r["bbox"] for r in results] == [[0.0, 0.0, 16.0, 16.0], [0.0, 0.0, 8.0, 2.0]]
    assert [r["category_id"] for r in results] == [5, 5]
    s = torch.sigmoid(torch.tensor(BIG)).item()
    assert [r["score"] for r in results] == pytest.approx([0.9 * s, 0.8 * s], abs=1e-6)


def test_category_map_is_checked():
    check_category_ids([1, 4, 9], 3)
    with pytest.raises(ValueError, match="3 ids but the model predicts 2"):
        check_category_ids([1, 4, 9], 2)
    with pytest.raises(ValueError, match="ascending"):
        check_category_ids([4, 1], 2)
    outputs = {"pred_logits": torch.zeros(1, 2, 3), "pred_masks": torch.zeros(1, 2, 4, 4)}
    batch = {"images": torch.zeros(1, 3, 8, 8), "image_ids": [1], "image_sizes": [(8, 8)],
             "orig_sizes": [(8, 8)]}
    with pytest.raises(ValueError, match="category map"):
        batch_to_coco_results(outputs, batch, category_ids=[1])


def test_no_instances_gives_no_results():
    outputs = {"pred_logits": torch.zeros(1, 2, 2), "pred_masks": torch.full((1, 2, 4, 4), -BIG)}
    batch = {"images": torch.zeros(1, 3, 8, 8), "image_ids": [1], "image_sizes": [(8, 8)],
             "orig_sizes": [(8, 8)]}
    assert batch_to_coco_results(outputs, batch, category_ids=[1]) == []


def test_mask_score_ignores_the_padding():
    # kernel 0 (p 0.9) is "on" only in padding cells; kernel 1 (p 0.6) inside the image.
    # Scored over the valid region only, kernel 1 is the single best detection.
    probs = [[0.9, 0.1], [0.6, 0.4]]
    masks = torch.full((2, 4, 4), -BIG)
    masks[0, 2:, :] = BIG  # rows 2-3 at stride 2 = padding rows 4-7 of the 8x8 input
    masks[1, :2, :2] = BIG
    inst = postprocess_image(logits_for(probs), masks, (8, 8), (4, 8), (4, 8), max_detections=1)
    s = torch.sigmoid(torch.tensor(BIG)).item()
    assert inst.scores.tolist() == pytest.approx([0.6 * s], abs=1e-6)

"""experiments/peers.py: the adapters that put transformers' Mask2Former and torchvision's Mask
R-CNN on our batch contract and our scoring, checked on planted inputs."""
import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from pipeline.evaluation import batch_to_coco_results

import importlib


peers = importlib.import_module("experiments.peers")


def planted_batch() -> dict:
    """Two images padded to 64x96; image 0 is 64x80 with a 10x20 box mask at rows 5..14,
    cols 30..49 (label 1) and a single pixel at (60, 79) (label 0); image 1 is 48x96."""
    images = torch.zeros(2, 3, 64, 96)
    images[0, :, :64, :80] = torch.randn(3, 64, 80, generator=torch.Generator().manual_seed(0))
    images[1, :, :48, :96] = 0.5
    m0 = torch.zeros(2, 64, 96, dtype=torch.bool)
    m0[0, 5:15, 30:50] = True
    m0[1, 60, 79] = True
    m1 = torch.zeros(1, 64, 96, dtype=torch.bool)
    m1[0, 10:40, 0:96] = True
    return {"images": images, "image_ids": [1, 2], "image_sizes": [(64, 80), (48, 96)],
            "orig_sizes": [(32, 40), (48, 96)],
            "targets": [{"masks": m0, "labels": torch.tensor([1, 0])},
                        {"masks": m1, "labels": torch.tensor([2])}]}


def test_maskrcnn_inputs_crop_to_the_valid_region_with_pixel_boxes_and_shifted_labels():
    images, targets = peers.maskrcnn_inputs(planted_batch())
    assert [tuple(im.shape) for im in images] == [(3, 64, 80), (3, 48, 96)]
    assert torch.equal(images[0], planted_batch()["images"][0, :, :64, :80])
    # xyxy with exclusive max: a 1-pixel mask has a 1x1 box (torchvision refuses empty boxes)
    assert targets[0]["boxes"].tolist() == [[30.0, 5.0, 50.0, 15.0], [79.0, 60.0, 80.0, 61.0]]
    assert targets[0]["labels"].tolist() == [2, 1]  # 0 is torchvision's background
    assert targets[0]["masks"].dtype == torch.uint8 and targets[0]["masks"].shape == (2, 64, 80)
    assert targets[1]["boxes"].tolist() == [[0.0, 10.0, 96.0, 40.0]]


def test_loop_seconds_per_step_weights_each_window_by_its_steps(tmp_path):
    lines = [{"kind": "train", "step": 10, "step_seconds": 1.0},
             {"kind": "eval", "step": 10, "val/segm_AP": 0.1},
             {"kind": "train", "step": 15, "step_seconds": 4.0}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert peers.loop_seconds_per_step(path) == pytest.approx((10 * 1.0 + 5 * 4.0) / 15)


def test_maskrcnn_trains_without_resizing_and_scores_at_the_original_size():
    torch.manual_seed(0)
    model = peers.build_maskrcnn(3, "resnet18", 96, None)
    assert isinstance(model.backbone.body.bn1, torch.nn.BatchNorm2d)  # trained BN from scratch
    batch = planted_batch()
    images, _ = peers.maskrcnn_inputs(batch)
    transformed, _ = model.transform(images)
    assert transformed.image_sizes == [(64, 80), (48, 96)]  # its own resize is off
    assert torch.equal(transformed.tensors[0, :, :64, :80], images[0])  # identity normalisation
    model.train()
    losses = peers.maskrcnn_loss(model, batch)
    assert {"loss_classifier", "loss_mask", "loss_box_reg"} <= set(losses)
    assert torch.isfinite(losses["loss"])
    losses["loss"].backward()
    results = peers.maskrcnn_results(model, [batch], [10, 20, 30], torch.device("cpu"))
    assert model.training is False
    for r in results:
        assert r["category_id"] in (10, 20, 30)
        height, width = batch["orig_sizes"][batch["image_ids"].index(r["image_id"])]
        assert r["segmentation"]["size"] == [height, width]
        assert mask_utils.decode(r["segmentation"]).sum() > 0


def test_hf_mask2former_speaks_our_output_contract():
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    inner = peers.build_hf_mask2former(3, "resnet18", num_queries=7, encoder_layers=1,
                                       decoder_layers=2, hidden_dim=32, mask_feature_size=32,
                                       feature_size=32, dim_feedforward=64,
                                       num_attention_heads=4)
    batch = planted_batch()
    loss = peers.hf_mask2former_loss(inner.train(), batch)["loss"]
    assert torch.isfinite(loss)
    loss.backward()
    wrapped = peers.QueryOutputs(inner).eval()
    with torch.no_grad():
        out = wrapped(batch["images"])
    assert tuple(out["pred_logits"].shape) == (2, 7, 4)  # 3 classes + no object
    assert tuple(out["pred_masks"].shape) == (2, 7, 16, 24)  # stride 4
    results = batch_to_coco_results(out, batch, [10, 20, 30])
    assert {r["image_id"] for r in results} <= {1, 2}
    assert all(r["segmentation"]["size"] == list(batch["orig_sizes"][r["image_id"] - 1])
               for r in results)


def test_valid_pixel_mask_marks_each_images_region():
    valid = peers.valid_pixel_mask(planted_batch())
    assert valid.shape == (2, 64, 96)
    assert valid[0].sum() == 64 * 80 and valid[0, :, 80:].sum() == 0
    assert valid[1].sum() == 48 * 96 and valid[1, 48:].sum() == 0


def test_table_rows_are_percent_and_sorted_by_model_order():
    row = {"size": 128, "steps": 250, "AP": 0.0512, "AP50": 0.119, "AP75": 0.03,
           "s_per_step": 1.234, "peak_mb": 1500.4, "parameters": 30_900_000}
    text = peers.table([{**row, "model": "maskrcnn"}, {**row, "model": "knet"}])
    lines = text.splitlines()
    assert lines[2].startswith("| 128 | 250 | knet | 5.1 | 11.9 | 3.0 | 1.234 | 1500 | 30.9 |")
    assert "maskrcnn" in lines[3]
    assert np.isclose(float(lines[3].split("|")[4]), 5.1)


def test_tiny_maskrcnn_is_our_tiny_backbone_under_a_width_64_fpn_and_trains():
    from experiments import peer_models

    from uplvp_model.backbone import TinyBackbone

    torch.manual_seed(0)
    model = peer_models.build_maskrcnn_tiny(3, 96)
    assert isinstance(model.backbone.body, TinyBackbone)
    assert model.backbone.body.out_channels == (16, 32, 64, 128)  # the study's tiny CNN
    assert model.roi_heads.fg_bg_sampler.batch_size_per_image == 128
    assert model.roi_heads.box_predictor.cls_score.out_features == 4  # 3 classes + background
    assert model.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 4
    levels = model.backbone(torch.zeros(1, 3, 64, 96))
    # strides 4, 8, 16, 32 and the max-pooled 64, each at width 64, in torchvision's order
    assert [(k, tuple(v.shape)) for k, v in levels.items()] == [
        ("0", (1, 64, 16, 24)), ("1", (1, 64, 8, 12)), ("2", (1, 64, 4, 6)),
        ("3", (1, 64, 2, 3)), ("pool", (1, 64, 1, 2))]
    batch = planted_batch()
    model.train()
    losses = peers.maskrcnn_loss(model, batch)
    assert {"loss_classifier", "loss_mask", "loss_box_reg", "loss_objectness"} <= set(losses)
    losses["loss"].backward()
    assert model.backbone.body.body[0][0].weight.grad.abs().sum() > 0  # reaches the backbone
    full = peers.build_maskrcnn(3, "resnet18", 96, None)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(model) * 20 < count(full)  # the study's size, not ResNet-18 FPN's


def test_loss_options_are_finetune_fields_and_unknown_ones_fail_in_one_line(capsys):
    from stages.finetune import FinetuneConfig

    assert set(peers.LOSS_OPTIONS) <= set(FinetuneConfig.model_fields)
    args = peers.parse_args(["--out", "x", "--loss", '{"importance_sample_ratio": 0.75}'])
    assert args.loss == {"importance_sample_ratio": 0.75}
    with pytest.raises(SystemExit) as exit_info:
        peers.parse_args(["--out", "x", "--loss", '{"dice": 4}'])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "--loss: unknown option(s) dice; choose from " + ", ".join(peers.LOSS_OPTIONS))


def test_the_table_file_names_the_settings_its_cells_share():
    args = peers.parse_args(["--out", "x", "--lr", "2e-4", "--threads", "1", "--data-seed", "8",
                             "--overrides", '{"hidden_dim": 256, "pixel_encoder_layers": 6}'])
    line = peers.settings_line(args)
    assert line.startswith("# peers.py: batch 4, lr 0.0002, warmup default, resnet18 random init,")
    assert '1 thread(s)' in line and 'preset small' in line
    assert 'overrides {"hidden_dim": 256, "pixel_encoder_layers": 6}, loss {}' in line
    assert line.endswith("data: generated by pipeline.synth, data seed 8, 80 train / 40 val")


def test_the_table_file_says_which_machines_its_cells_ran_on():
    rows = [{"machine": "cpu B"}, {"machine": "cpu A"}, {"machine": "cpu A"}, {}]
    assert peers.machines_line(rows) == "# ran on: cpu A (2 cells); cpu B (1 cell); not recorded (1 cell)"
    name = peers.machine_name("cpu")
    chip, version = name.rsplit(", torch ", 1)
    assert chip.strip() and version == torch.__version__

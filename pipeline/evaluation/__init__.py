"""Evaluation and inference, one library: checkpoint -> model -> post-processing -> COCO scores.

    inference.py    a fine-tuned checkpoint loaded for inference; predictions over a loader as
                    COCO results; their scores (distributed: each rank its slice, rank 0 scores)
    postprocess.py  model outputs -> instances (scores, labels, masks at image size) -> COCO
                    results (RLE masks, boxes)
    coco_eval.py    pycocotools COCOeval segm + bbox, per-category and class-agnostic AP
    report.py       the per-category table and unreadable-image lines on the terminal

``uplvp stage evaluate``, ``uplvp predict``, fine-tuning's validation and the benchmarks call
it; it imports nothing from ``stages``.
"""
from pipeline.evaluation.coco_eval import (
    IOU_TYPES,
    SUMMARY_KEYS,
    class_agnostic_segm,
    evaluate_predictions,
    flat_metrics,
    ground_truth_coco,
    per_category_ap,
    results_coco,
    run_cocoeval,
    summary_metrics,
    without_images,
)
from pipeline.evaluation.inference import (
    InferenceModel,
    check_categories_match,
    evaluate_model,
    gather_to_rank0,
    load_inference_model,
    model_config_of,
    predict_results,
    read_model_checkpoint,
    resolve_checkpoint,
)
from pipeline.evaluation.postprocess import (
    Instances,
    batch_to_coco_results,
    check_category_ids,
    instances_to_coco,
    postprocess_batch,
    postprocess_image,
)
from pipeline.evaluation.report import print_metrics, report_unreadable

__all__ = [
    "IOU_TYPES", "SUMMARY_KEYS", "InferenceModel", "Instances", "batch_to_coco_results",
    "check_categories_match", "check_category_ids", "class_agnostic_segm", "evaluate_model",
    "evaluate_predictions", "flat_metrics", "gather_to_rank0", "ground_truth_coco",
    "instances_to_coco", "load_inference_model", "model_config_of", "per_category_ap",
    "postprocess_batch", "postprocess_image", "predict_results", "print_metrics",
    "read_model_checkpoint", "report_unreadable", "resolve_checkpoint", "results_coco",
    "run_cocoeval", "summary_metrics", "without_images",
]

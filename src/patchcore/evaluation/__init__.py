"""Evaluation: metrics, ensemble combination, results tables, overlays, per-image records."""

from patchcore.exports import lazy_exports

__all__ = [
    "METRIC_NAMES",
    "combine_members",
    "compute_metrics",
    "evaluate_models",
    "format_results_table",
    "read_predictions",
    "read_results_csv",
    "save_segmentation_images",
    "write_predictions",
    "write_results_csv",
]  # fmt: skip

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "compute_metrics": "patchcore.evaluation.metrics",
        "METRIC_NAMES": "patchcore.evaluation.metrics",
        "combine_members": "patchcore.evaluation.ensemble",
        "write_results_csv": "patchcore.evaluation.reporting",
        "read_results_csv": "patchcore.evaluation.reporting",
        "format_results_table": "patchcore.evaluation.reporting",
        "save_segmentation_images": "patchcore.evaluation.visualization",
        "write_predictions": "patchcore.evaluation.records",
        "read_predictions": "patchcore.evaluation.records",
        "evaluate_models": "patchcore.evaluation.testset",
    },
)

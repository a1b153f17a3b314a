"""Apps: the jobs the commands run (train/evaluate runs, predict, export, challenge
evaluation) and the operator dashboard. Click commands live in `patchcore.cli`."""

from patchcore.exports import lazy_exports

__all__ = [
    "evaluate_run",
    "export_challenge_models",
    "export_models",
    "open_exported",
    "run_challenge",
    "run_prediction",
    "train_run",
]  # fmt: skip

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "train_run": "patchcore.apps.runs",
        "evaluate_run": "patchcore.apps.runs",
        "run_prediction": "patchcore.apps.predict",
        "export_challenge_models": "patchcore.apps.export",
        "export_models": "patchcore.apps.export",
        "open_exported": "patchcore.apps.runtimes",
        "run_challenge": "patchcore.apps.challenge",
    },
)

"""Apps: the jobs the commands run (train/evaluate runs, predict, export, challenge
evaluation) and the operator dashboard. Click commands live in `patchcore.cli`."""

from patchcore.exports import lazy_exports

__all__ = ["train_run", "evaluate_run", "run_prediction", "export_challenge_models", "run_challenge"]

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "train_run": "patchcore.apps.runs",
        "evaluate_run": "patchcore.apps.runs",
        "run_prediction": "patchcore.apps.predict",
        "export_challenge_models": "patchcore.apps.export",
        "run_challenge": "patchcore.apps.challenge",
    },
)

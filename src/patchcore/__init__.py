"""PatchCore: anomaly detection and segmentation from defect-free images only.

The package reads as the pipeline (see the module map in docs/reference/package-layout.md):
- `patchcore.data`: datasets, preprocessing (image or mask to tensor), synthetic data;
- `patchcore.model`: backbones, patch features, samplers, search, the scorer, the
  `PatchCore` estimator, calibration (decisions) and saving/loading;
- `patchcore.evaluation`: metrics, ensembles, results tables, overlays, per-image records;
- `patchcore.apps`: the jobs behind the commands (train/evaluate runs, predict, export,
  challenge evaluation, the dashboard);
- `patchcore.cli`: every command line, with one shared set of options.
"""

from patchcore.exports import lazy_exports

__version__ = "0.2.0"

__all__ = ["PatchCore", "PatchCoreConfig", "__version__", "load_models", "save_models"]

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "PatchCore": "patchcore.model.patchcore",
        "PatchCoreConfig": "patchcore.config",
        "save_models": "patchcore.model.serialization",
        "load_models": "patchcore.model.serialization",
    },
)

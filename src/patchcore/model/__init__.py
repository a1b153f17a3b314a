"""Model: backbones, patch features, samplers, search, the scorer, the estimator, decisions,
saving and loading, and the self-contained `PatchCoreModule`."""

from patchcore.exports import lazy_exports

__all__ = [
    "AnySizePatchCore",
    "FixedSizePatchCore",
    "NormalStatistics",
    "PatchCore",
    "PatchCoreModule",
    "Prediction",
    "build_embedder",
    "build_index",
    "build_sampler",
    "colour_range",
    "decide",
    "load_backbone",
    "load_models",
    "save_models",
    "score_images",
]  # fmt: skip

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "PatchCore": "patchcore.model.patchcore",
        "Prediction": "patchcore.model.scoring",
        "score_images": "patchcore.model.scoring",
        "NormalStatistics": "patchcore.model.calibration",
        "decide": "patchcore.model.calibration",
        "colour_range": "patchcore.model.calibration",
        "save_models": "patchcore.model.serialization",
        "load_models": "patchcore.model.serialization",
        "PatchCoreModule": "patchcore.model.module",
        "FixedSizePatchCore": "patchcore.model.module",
        "AnySizePatchCore": "patchcore.model.module",
        "load_backbone": "patchcore.model.backbones",
        "build_embedder": "patchcore.model.features",
        "build_sampler": "patchcore.model.samplers",
        "build_index": "patchcore.model.search",
    },
)

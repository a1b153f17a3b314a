"""Data: MVTec-layout datasets, the one preprocessing module, synthetic data."""

from patchcore.exports import lazy_exports

__all__ = [
    "ImageDataset",
    "Sample",
    "SyntheticSpec",
    "generate_category",
    "generate_dataset",
    "image_tensor",
    "list_samples",
    "load_image",
    "mask_tensor",
    "open_image",
    "split_loader",
]  # fmt: skip

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        **dict.fromkeys(["ImageDataset", "Sample", "list_samples", "split_loader"],
                        "patchcore.data.datasets"),
        **dict.fromkeys(["image_tensor", "mask_tensor", "open_image", "load_image"],
                        "patchcore.data.preprocessing"),
        **dict.fromkeys(["SyntheticSpec", "generate_dataset", "generate_category"],
                        "patchcore.data.synthetic"),
    },
)  # fmt: skip

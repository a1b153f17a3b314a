"""PatchCore: anomaly detection and segmentation from defect-free images only."""

__version__ = "0.1.0"

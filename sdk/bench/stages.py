"""The canonical stages of the bench report (shared by the product drivers and the naive baseline,
which therefore do not import each other)."""

#: canonical stages of the report, in pipeline order
STAGES = ("decode", "hu", "eligibility", "resample", "lungs", "select", "classify", "aggregate")
STAGE_LABELS = {
    "decode": "decode", "hu": "HU", "eligibility": "eligibility", "resample": "resample",
    "lungs": "lung segmentation", "select": "slice selection", "classify": "classification",
    "aggregate": "aggregation", "other": "other", "total": "total",
}

__all__ = ["STAGES", "STAGE_LABELS"]

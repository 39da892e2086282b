"""Subject-wise k-fold cross-validation of teacher fine-tuning + distillation (`mirage-edge cv`).

`folds` (torch-free) groups a segmentation set's B-scans by subject, cuts the folds and writes each
fold's dataset as a folder of links; `run` fine-tunes and distils fold after fold (resumable);
`report` (torch-free) turns the per-fold distill reports into cv.json and README.md.
"""
from __future__ import annotations

__all__ = ["folds", "run", "report"]

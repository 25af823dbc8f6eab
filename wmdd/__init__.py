"""wmdd: Dataset Distillation via the Wasserstein Metric (Liu et al., arXiv 2311.18531).

Only what two or more stage scripts share lives here; each stage is a script at the repo root.
"""
__version__ = "0.1.0"

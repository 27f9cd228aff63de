"""A hand-rolled PyTorch engine for fine-tuning transformer classifiers on sentiment data."""
__version__ = "0.1.0"

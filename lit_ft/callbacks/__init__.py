"""Callbacks, one concern per file."""

from lit_ft.callbacks.predictions import PredictionWriter

__all__ = ["PredictionWriter"]

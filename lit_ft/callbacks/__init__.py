"""Callbacks, one concern per file."""

from lit_ft.callbacks.ema import EMA, SWA, WeightAverage
from lit_ft.callbacks.predictions import PredictionWriter

__all__ = ["EMA", "SWA", "WeightAverage", "PredictionWriter"]

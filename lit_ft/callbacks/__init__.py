"""Callbacks, one concern per file."""

from lit_ft.callbacks.checkpointing import AtomicCheckpointIO, LastEpochCheckpoint
from lit_ft.callbacks.confusion import ConfusionLogger
from lit_ft.callbacks.ema import EMA, SWA, WeightAverage
from lit_ft.callbacks.interrupt import GracefulInterrupt, TrainingInterrupted
from lit_ft.callbacks.lp_head import LinearProbeHead
from lit_ft.callbacks.nan_guard import NaNGuard
from lit_ft.callbacks.predictions import PredictionWriter
from lit_ft.callbacks.run_record import RunRecord
from lit_ft.callbacks.samples import TrainSamplesLogger
from lit_ft.callbacks.throughput import ThroughputLogger

__all__ = ["EMA", "SWA", "WeightAverage", "ConfusionLogger", "PredictionWriter", "RunRecord", "ThroughputLogger", "TrainSamplesLogger",
           "AtomicCheckpointIO", "LastEpochCheckpoint", "GracefulInterrupt", "TrainingInterrupted", "NaNGuard",
           "LinearProbeHead"]

"""Callbacks, one concern per file."""

from lit_ft.callbacks.budget import BudgetCounter
from lit_ft.callbacks.cam import GradCAMLogger
from lit_ft.callbacks.checkpointing import AtomicCheckpointIO
from lit_ft.callbacks.class_report import ClassReport
from lit_ft.callbacks.confusion import ConfusionLogger
from lit_ft.callbacks.ema import EMA, SWA, WeightAverage
from lit_ft.callbacks.interrupt import GracefulInterrupt, TrainingInterrupted
from lit_ft.callbacks.lp_head import LinearProbeHead
from lit_ft.callbacks.nan_guard import NaNGuard
from lit_ft.callbacks.plan_monitor import PlanMonitor
from lit_ft.callbacks.predictions import PredictionWriter
from lit_ft.callbacks.reliability import ReliabilityLogger
from lit_ft.callbacks.run_record import RunRecord
from lit_ft.callbacks.samples import TrainSamplesLogger
from lit_ft.callbacks.throughput import throughput_monitor

__all__ = ["EMA", "SWA", "WeightAverage", "BudgetCounter", "ConfusionLogger", "PlanMonitor", "PredictionWriter", "RunRecord",
           "TrainSamplesLogger", "throughput_monitor", "AtomicCheckpointIO", "GracefulInterrupt", "TrainingInterrupted",
           "NaNGuard", "ClassReport", "GradCAMLogger", "ReliabilityLogger", "LinearProbeHead"]

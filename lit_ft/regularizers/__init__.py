"""Regularizers for fine-tuning, configured under ``model.regularizers`` / ``model.mixup``.

Loss-side terms (one file each): :class:`L2SP`, :class:`DELTA`, :class:`BSS`, :class:`L1`,
:class:`L2`. Input-side: :class:`Mixup` (mixup/CutMix). Weight averaging (EMA, SWA) lives in
:mod:`lit_ft.callbacks.ema`.
"""

from lit_ft.regularizers.base import Regularizer, StepOutputs, unique_names
from lit_ft.regularizers.bss import BSS
from lit_ft.regularizers.delta import DELTA
from lit_ft.regularizers.l2sp import L2SP
from lit_ft.regularizers.mixup import Mixup
from lit_ft.regularizers.norms import L1, L2

__all__ = ["BSS", "DELTA", "L1", "L2", "L2SP", "Mixup", "Regularizer", "StepOutputs", "unique_names"]

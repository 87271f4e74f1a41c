"""WiSE-FT (Wortsman et al. 2022, arXiv 2109.01903): interpolate between the pretrained and the
fine-tuned weights, ``(1 - a) * w0 + a * w1``, and pick ``a`` on the validation split.

    lit-ft wise -c configs/experiments/_base.yaml -c configs/experiments/lp_ft.yaml --ckpt_path best

Owns: the two ends of the interpolation (:func:`endpoints`: the pretrained weights rebuilt from
the checkpoint's own ``pretrained`` setting, and the head policy), the grid over ``a``, the
choice of ``a``, the ``lit-ft wise`` command and its table. The arithmetic and BatchNorm
recalibration are :mod:`lit_ft.weight_space`'s; the shifted test sets are
:mod:`lit_ft.robustness`'s.

The ends: ``a = 1`` is the fine-tuned checkpoint exactly. ``a = 0`` is the pretrained backbone
(``pretrained`` of the run: an offline package, a weights file, timm hub weights, an earlier
lit-ft checkpoint) with a head chosen by the head policy, because a freshly initialised head at
that end ruins the interpolation (wise-ft#9):

* ``lp``: the head from the run's head-only phase (LP-FT, FreezeUnfreeze, Gradual: saved by the
  ``lp_head`` callback, :class:`~lit_ft.callbacks.lp_head.LinearProbeHead`). ``a = 0`` is then
  the linear probe; the head is interpolated from it to the fine-tuned head, as the backbone is.
* ``finetuned``: the fine-tuned head at every ``a``; only the backbone is interpolated. The
  small-``a`` end pairs nearly pretrained features with a head trained on fine-tuned ones.
* ``auto`` (default): ``lp`` when the checkpoint has such a head, else ``finetuned`` with a warning.

BatchNorm: for ``0 < a < 1`` the running statistics are recomputed on training images, as for
soups (``bn_batches: 0`` interpolates them instead), except in BN layers the run never changed
(frozen: the same statistics at both ends). The ends keep their own statistics: the fine-tuned
model's, and at ``a = 0`` the pretrained ones that the linear probe was trained with.

Choosing ``a``: the grid value with the best validation accuracy; with ``tolerance`` the
smallest ``a`` within that much of the best; ties go to the smaller ``a`` (the same validation
accuracy with more of the pretrained model's robustness); or a fixed ``alpha``. The shifted test
sets are reported for every ``a`` but never used to choose it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Mapping, Optional, Sequence, Union

import torch

from lit_ft import backbones as B
from lit_ft import weight_space as W
from lit_ft.callbacks.lp_head import LinearProbeHead
from lit_ft.data.corruptions import SEVERITIES, CorruptionName
from lit_ft.errors import UserError
from lit_ft.experiment import evaluation_options
from lit_ft.models import ImageClassifier
from lit_ft.robustness import robustness_report
from lit_ft.tables import markdown, write_tables
from lit_ft.weights import classifier_keys

if TYPE_CHECKING:
    from lit_ft.cli import LitFTCLI

PathLike = Union[str, Path]
HeadPolicy = Literal["auto", "lp", "finetuned"]
DEFAULT_ALPHAS = tuple(i / 10 for i in range(11))


def pretrained_network(checkpoint: Mapping[str, Any]) -> torch.nn.Module:
    """The run's starting point: the timm network built from the checkpoint's ``backbone`` and
    ``pretrained`` (its fresh head initialised by ``head_init``), as the run built it.

    Raises:
        UserError: the run started from random weights, or its weights cannot be loaded here.
    """
    hp = dict(checkpoint.get("hyper_parameters") or {})
    pretrained = hp.get("pretrained")
    if pretrained in (False, None, "", "false"):
        raise UserError(
            "the checkpoint was trained from random weights (pretrained: false): WiSE-FT interpolates towards "
            "the pretrained weights, and there are none",
            "use a run fine-tuned from pretrained weights (model.pretrained)",
        )
    names = hp.get("class_names") or (checkpoint.get("lit_ft") or {}).get("class_names")
    num_classes = hp.get("num_classes") or (len(names) if names else None)
    return B.create_backbone(
        hp["backbone"], int(num_classes), pretrained, hp.get("drop_rate") or 0.0, hp.get("drop_path_rate"),
        hp.get("head_init") or "zeros",
    )


def endpoints(
    checkpoint: Mapping[str, Any], head: HeadPolicy = "auto", path: str = "the checkpoint"
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], str]:
    """``(w0, w1, head_source)``: the state dicts at ``a = 0`` and ``a = 1`` and which head ``w0`` has.

    ``w1`` is the checkpoint's state dict. ``w0`` has the pretrained backbone, the head given
    by ``head`` (see the module docstring) and, for entries outside the network (regularizer
    anchors), the checkpoint's own values.
    """
    if head not in ("auto", "lp", "finetuned"):
        raise UserError(f"unknown head policy {head!r}", "use auto, lp or finetuned")
    w1 = dict(checkpoint["state_dict"])
    net = pretrained_network(checkpoint)
    pre = {f"model.{k}": v for k, v in net.state_dict().items()}
    classifier = {f"model.{k}" for k in classifier_keys(net)}
    net_keys = [k for k in w1 if k.startswith("model.")]
    wrong = [k for k in net_keys if k not in pre or tuple(pre[k].shape) != tuple(w1[k].shape)]
    if wrong or len(pre) != len(net_keys):
        k = wrong[0] if wrong else min(set(pre) - set(net_keys))
        raise UserError(f"the pretrained weights do not match {path}: {k}", "was the run's backbone or pretrained setting changed?")
    lp = LinearProbeHead.from_checkpoint(checkpoint)
    if head == "lp" and lp is None:
        raise UserError(
            f"{path} has no head from a head-only (linear-probe) phase",
            "fine-tune with an LP phase (freeze: LPFT or FreezeUnfreeze) and the lp_head callback on, "
            "and pass a full checkpoint (not weights-only); or use --head finetuned",
        )
    if head == "auto" and lp is None:
        warnings.warn(
            f"lit-ft: {path} has no head from a head-only (linear-probe) phase: WiSE-FT keeps the fine-tuned head "
            "at every a, so small a pairs nearly pretrained features with a head trained on fine-tuned ones. "
            "For a proper a = 0 end, fine-tune with freeze: LPFT (or FreezeUnfreeze)",
            stacklevel=2,
        )
    use_lp = lp is not None and head in ("auto", "lp")
    head_keys = set(lp) if use_lp else set()
    if use_lp and any(k not in w1 or tuple(lp[k].shape) != tuple(w1[k].shape) for k in lp):
        raise UserError(f"the saved linear-probe head of {path} does not fit its model", "use --head finetuned")
    w0 = {}
    for k, v in w1.items():
        if k in head_keys:
            w0[k] = lp[k]
        elif k in classifier or not k.startswith("model."):
            w0[k] = v  # the fine-tuned head (policy finetuned), or not part of the network
        else:
            w0[k] = pre[k]
    return w0, w1, ("linear-probe head" if use_lp else "fine-tuned head")


@dataclass
class WiseResult:
    """What :func:`wise_ft` returns.

    Attributes:
        model: the classifier at the chosen ``a`` (eval mode).
        checkpoint: it as an ordinary lit-ft checkpoint (see :meth:`save`).
        alpha: the chosen ``a``.
        rows: one row per ``a``: validation accuracy and, if measured, clean and mean corruption
            accuracy on the shifted test sets.
        head: which head the ``a = 0`` end had.
    """

    model: ImageClassifier
    checkpoint: dict[str, Any]
    alpha: float
    rows: list[dict[str, Any]]
    head: str

    def save(self, path: PathLike) -> Path:
        """Write the interpolated checkpoint (atomically) and the table beside it (``.md``, ``.csv``)."""
        path = W.save_checkpoint(self.checkpoint, path)
        info = self.checkpoint["lit_ft"]["wise"]
        notes = (f"WiSE-FT of {info['finetuned']}: a = 0 is the pretrained backbone with the {self.head}, a = 1 the "
                 f"fine-tuned model; BatchNorm statistics for 0 < a < 1 {info['bn']}. Chosen a = {self.alpha:g} "
                 f"({info['chosen_by']}). Checkpoint: {path}")
        write_tables(path.with_suffix(""), "lit-ft wise", self.rows, notes)
        return path

    def table(self) -> str:
        return markdown(self.rows)


def wise_ft(
    checkpoint: PathLike,
    datamodule: Any,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    alpha: Optional[float] = None,
    tolerance: float = 0.0,
    head: HeadPolicy = "auto",
    bn_batches: int = 32,
    robustness: bool = False,
    corruptions: Optional[Sequence[str]] = None,
    severities: Sequence[int] = SEVERITIES,
    shift_subset: Optional[int] = 1000,
    device: Optional[Union[str, torch.device]] = None,
    **trainer_kwargs: Any,
) -> WiseResult:
    """WiSE-FT of a fine-tuned checkpoint over a grid of ``a``; returns the model at the chosen ``a``.

    Args:
        checkpoint: the fine-tuned lit-ft checkpoint.
        datamodule: the data (validation split to choose ``a``, training images for BN statistics,
            test split for the shifted sets).
        alphas: the grid (each in [0, 1]).
        alpha: use this ``a`` (it joins the grid) instead of choosing on validation.
        tolerance: choose the smallest ``a`` whose validation accuracy is within this of the best.
        head: ``auto``, ``lp`` or ``finetuned`` (see the module docstring).
        bn_batches: batches of training images for BN statistics at ``0 < a < 1`` (0: interpolate them).
        robustness: also test every ``a`` on the shifted test sets (reported, never used to choose).
        corruptions: for ``robustness`` (default: all).
        severities: for ``robustness``.
        shift_subset: test images per shifted set (None: all).
        device: where BN statistics are recomputed (default: CUDA if available, else CPU).
        **trainer_kwargs: options of the quiet evaluation ``Trainer``.
    """
    grid = sorted({float(a) for a in alphas} | ({float(alpha)} if alpha is not None else set()))
    if not grid or any(not 0.0 <= a <= 1.0 for a in grid):
        raise UserError(f"every a must be in [0, 1], got {grid}", "e.g. --alphas '[0, 0.25, 0.5, 0.75, 1]'")
    if tolerance < 0:
        raise UserError(f"tolerance must be >= 0, got {tolerance}", "0 picks the best validation accuracy")
    if bn_batches < 0:
        raise UserError(f"bn_batches must be >= 0, got {bn_batches}", "0 interpolates the BatchNorm statistics")
    path = str(checkpoint)
    ckpt = W.read_checkpoint(path)
    w0, w1, head_source = endpoints(ckpt, head, path)
    model = ImageClassifier.load_from_checkpoint(path, map_location="cpu", weights_only=True, pretrained=False)
    model.eval()
    names = (ckpt.get("hyper_parameters") or {}).get("class_names")
    W.prepare_data(datamodule, model, path, names)
    judge = W.WeightEvaluator(model, datamodule, bn_batches, device, trainer_kwargs)

    rows: list[dict[str, Any]] = []
    for a in grid:
        row: dict[str, Any] = {"a": a, "val_acc": judge.accuracy(W.interpolate(w0, w1, a), [w0, w1] if 0.0 < a < 1.0 else None)}
        if robustness:
            report = robustness_report(model, datamodule, corruptions, severities, shift_subset, clean=False, **trainer_kwargs)
            row.update(clean_test_acc=report.clean_subset_acc, mean_corruption_acc=report.mean_corruption_acc)
        rows.append(row)
    if alpha is not None:
        chosen, rule = float(alpha), "given"
    else:
        best = max(r["val_acc"] for r in rows)
        chosen = min(r["a"] for r in rows if r["val_acc"] >= best - tolerance)
        rule = "best validation accuracy" + (f" within {tolerance:g}, smallest a" if tolerance else "; ties: smallest a")
    for r in rows:
        r["chosen"] = r["a"] == chosen
    # Rebuilt rather than kept from the grid (one state in memory, not one per a): the BN
    # pass is deterministic (fixed images, eval transform, no dropout), so it is the same model.
    judge.load(W.interpolate(w0, w1, chosen), [w0, w1] if 0.0 < chosen < 1.0 else None)
    model.eval()
    bn = judge.bn_description([w0, w1], averaged="interpolated")
    provenance = {
        "finetuned": path, "alpha": chosen, "chosen_by": rule, "head": head_source, "bn": bn,
        "grid": [{k: v for k, v in r.items() if k != "chosen"} for r in rows],
    }
    return WiseResult(model, W.derived_checkpoint(ckpt, W.snapshot(model), "wise", provenance), chosen, rows, head_source)


def wise_command(
    cli: "LitFTCLI",
    alphas: Optional[list[float]] = None,
    alpha: Optional[float] = None,
    tolerance: float = 0.0,
    head: HeadPolicy = "auto",
    bn_batches: int = 32,
    robustness: bool = True,
    corruptions: Optional[list[CorruptionName]] = None,
    severities: list[int] = list(SEVERITIES),
    shift_subset: Optional[int] = 1000,
    out: Optional[str] = None,
) -> None:
    """WiSE-FT: interpolate a fine-tuned model with its pretrained weights, pick a on validation.

    Needs ``--ckpt_path best|last|file`` (the fine-tuned run); the pretrained weights come from
    that run's own ``pretrained`` setting. Writes the checkpoint at the chosen a (``lit-ft test
    --ckpt_path <out>``) and a table of every a (``.md``, ``.csv`` beside it).

    Args:
        alphas: the grid of a (0 = pretrained, 1 = fine-tuned); default 0, 0.1, ..., 1.
        alpha: use this a instead of choosing on validation.
        tolerance: choose the smallest a whose validation accuracy is within this of the best.
        head: head at a = 0: ``lp`` (from the run's head-only phase), ``finetuned``, or ``auto``
            (lp when the checkpoint has it, else finetuned with a warning).
        bn_batches: batches of training images (of data.eval_batch_size) over which BatchNorm
            statistics are recomputed for 0 < a < 1; 0 interpolates them.
        robustness: also test every a on the shifted test sets (reported, never used to choose a).
        corruptions: for robustness (default: all).
        severities: for robustness, 1..5.
        shift_subset: test images per shifted set.
        out: the checkpoint; default ``<log_dir>/wise.ckpt`` of this command's logger.
    """
    ckpt = cli.config.get("ckpt_path")
    if not ckpt:
        raise UserError("lit-ft wise needs the fine-tuned run", "pass --ckpt_path best, last or a .ckpt file")
    result = wise_ft(
        ckpt, cli.datamodule, DEFAULT_ALPHAS if alphas is None else alphas, alpha, tolerance, head, bn_batches,
        robustness, corruptions, severities, shift_subset, **evaluation_options(cli.config),
    )
    path = result.save(out or Path(cli.trainer.log_dir or ".") / "wise.ckpt")
    writer = getattr(cli.trainer.logger, "experiment", None)
    if hasattr(writer, "add_scalar"):
        for r in result.rows:
            step = round(100 * r["a"])  # the x axis is a in percent
            for key in ("val_acc", "clean_test_acc", "mean_corruption_acc"):
                if r.get(key) is not None:
                    writer.add_scalar(f"wise/{key}", r[key], step)
        writer.flush()
    print(result.table(), flush=True)
    print(f"lit-ft: WiSE-FT a={result.alpha:g} ({result.head} at a=0); wrote {path} and {path.with_suffix('.md')}", flush=True)

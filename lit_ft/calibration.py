"""Are the probabilities meaningful? Temperature scaling, calibration error, reliability diagrams,
and the ``lit-ft calibrate`` command.

Owns: fitting one temperature ``T`` on validation logits (Guo et al. 2017: LBFGS on the
negative log-likelihood of ``softmax(logits / T)``; ``T > 0`` never changes the argmax, so
accuracy is untouched), the NLL/ECE numbers before and after, the reliability-diagram bins and
figure, and writing ``T`` into a checkpoint. The model applies ``T`` itself
(``ImageClassifier.temperature``, saved in the checkpoint's ``lit_ft`` dict); this module
never reaches into the model beyond that public buffer.

The expected calibration error is torchmetrics' (``MulticlassCalibrationError``, l1, equal-width
bins); the diagram needs the per-bin numbers torchmetrics does not return, so
:func:`reliability_bins` recomputes them with the same bucketing (``bucketize(right=True)``
over ``linspace(0, 1, n_bins + 1)``, a confidence of exactly 1 in an extra last bin), and
:func:`ece_from_bins` equals torchmetrics' value on the same inputs (tested).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torchmetrics.functional.classification import multiclass_calibration_error

from lit_ft.errors import UserError

if TYPE_CHECKING:
    from lit_ft.cli import LitFTCLI

DEFAULT_BINS = 15  # Guo et al. 2017 and torchmetrics' default


# ---------------------------------------------------------------------------- numbers
def nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``softmax(logits / temperature)`` (= cross-entropy)."""
    return float(F.cross_entropy(logits.double() / temperature, labels))


def expected_calibration_error(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0, n_bins: int = DEFAULT_BINS
) -> float:
    """ECE (l1, ``n_bins`` equal-width confidence bins) of ``softmax(logits / temperature)``: torchmetrics'."""
    probs = (logits.double() / temperature).softmax(-1).float()
    return float(multiclass_calibration_error(probs, labels, num_classes=logits.shape[-1], n_bins=n_bins, norm="l1"))


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 100) -> float:
    """The temperature ``T`` minimising the NLL of ``softmax(logits / T)`` on (validation) data.

    LBFGS with a strong-Wolfe line search on ``log T`` (so ``T`` stays positive), in float64 on
    the CPU: one scalar, a convex-in-practice 1-D problem, converged in a few iterations.

    Args:
        logits: ``(N, C)`` uncalibrated logits (temperature 1).
        labels: ``(N,)`` class indices.
        max_iter: LBFGS iterations.
    """
    if logits.ndim != 2 or labels.shape != logits.shape[:1] or len(labels) == 0:
        raise UserError(
            f"temperature fitting needs (N, C) logits and N labels, got {tuple(logits.shape)} and {tuple(labels.shape)}",
            "the validation split must not be empty",
        )
    z = logits.detach().double().cpu()
    y = labels.detach().long().cpu()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    t = float(log_t.detach().exp())
    if not math.isfinite(t) or t <= 0:  # e.g. every logit equal: any T fits, keep 1
        return 1.0
    # LBFGS may stop where the NLL is flat; never return a temperature worse than none.
    return t if nll(z, y, t) <= nll(z, y, 1.0) else 1.0


@dataclass
class CalibrationNumbers:
    """NLL and ECE of one split at temperature 1 and at the fitted temperature."""

    split: str
    images: int
    nll_before: float
    nll_after: float
    ece_before: float
    ece_after: float
    accuracy: float


def calibration_numbers(
    split: str, logits: torch.Tensor, labels: torch.Tensor, temperature: float, n_bins: int = DEFAULT_BINS
) -> CalibrationNumbers:
    """:class:`CalibrationNumbers` of ``logits`` (uncalibrated) before/after ``temperature``."""
    return CalibrationNumbers(
        split=split,
        images=len(labels),
        nll_before=nll(logits, labels),
        nll_after=nll(logits, labels, temperature),
        ece_before=expected_calibration_error(logits, labels, 1.0, n_bins),
        ece_after=expected_calibration_error(logits, labels, temperature, n_bins),
        accuracy=float((logits.argmax(-1) == labels).double().mean()),
    )


def format_numbers(temperature: float, rows: list[CalibrationNumbers]) -> str:
    """The report table ``lit-ft calibrate`` prints."""
    lines = [
        f"temperature {temperature:.4f} (fitted on the validation split; > 1 means the model was overconfident)",
        f"{'split':<12}{'images':>8}{'accuracy':>10}{'NLL before':>12}{'NLL after':>11}{'ECE before':>12}{'ECE after':>11}",
    ]
    for r in rows:
        lines.append(
            f"{r.split:<12}{r.images:>8}{r.accuracy:>10.2%}{r.nll_before:>12.4f}{r.nll_after:>11.4f}"
            f"{r.ece_before:>12.2%}{r.ece_after:>11.2%}"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------- reliability diagram
def reliability_bins(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = DEFAULT_BINS) -> torch.Tensor:
    """Per-bin sums ``(3, n_bins + 1)``: image count, summed confidence, summed correctness.

    Sums, not means, so batches and ranks add up (``strategy.reduce(..., "sum")``). Bucketing as
    torchmetrics' calibration error: bin ``i`` holds confidences in ``[i/n, (i+1)/n)``, the extra
    last bin those equal to 1.
    """
    conf, pred = probs.detach().float().max(-1)  # (N,), (N,)
    correct = (pred == labels).float()
    bounds = torch.linspace(0, 1, n_bins + 1, device=conf.device, dtype=conf.dtype)
    idx = torch.bucketize(conf, bounds, right=True) - 1
    out = torch.zeros(3, n_bins + 1, device=conf.device, dtype=torch.float64)
    out[0].scatter_add_(0, idx, torch.ones_like(conf, dtype=torch.float64))
    out[1].scatter_add_(0, idx, conf.double())
    out[2].scatter_add_(0, idx, correct.double())
    return out


def ece_from_bins(bins: torch.Tensor) -> float:
    """Expected calibration error from :func:`reliability_bins` sums: ``sum_b |acc_b - conf_b| n_b / N``."""
    count, conf, correct = bins.double().cpu()
    total = float(count.sum())
    return float((correct - conf).abs().sum() / total) if total else 0.0


def reliability_figure(bins: torch.Tensor, title: str = "") -> Figure:
    """Reliability diagram: accuracy per confidence bin against the diagonal (perfect
    calibration), the gap shaded, and a histogram of how many images fall in each bin.

    Args:
        bins: :func:`reliability_bins` sums (the last, "confidence = 1" bin is drawn with the one before).
        title: figure title (the ECE is appended).
    """
    count, conf, correct = (t.numpy() for t in bins.double().cpu())
    count, conf, correct = _merge_last(count), _merge_last(conf), _merge_last(correct)
    n = len(count)
    edges = np.linspace(0, 1, n + 1)
    centers = (edges[:-1] + edges[1:]) / 2
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.where(count > 0, correct / count, np.nan)
        mean_conf = np.where(count > 0, conf / count, np.nan)
    fig = Figure(figsize=(5.0, 6.0), dpi=100)
    FigureCanvasAgg(fig)
    ax, hist = fig.subplots(2, 1, gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    ax.plot([0, 1], [0, 1], ls="--", color="gray", lw=1, label="perfect calibration")
    has = count > 0
    ax.bar(centers[has], acc[has], width=1 / n, edgecolor="black", color="tab:blue", alpha=0.8, label="accuracy")
    gap_bottom = np.minimum(acc, mean_conf)[has]
    ax.bar(centers[has], np.abs(acc - mean_conf)[has], bottom=gap_bottom, width=1 / n, color="tab:red", alpha=0.35,
           label="gap to mean confidence")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.legend(loc="upper left", fontsize=8)
    ece = ece_from_bins(bins)
    ax.set_title(f"{title + ': ' if title else ''}ECE {ece:.2%} of {int(count.sum())}", fontsize=10)
    hist.bar(centers, count, width=1 / n, color="gray", edgecolor="black")
    hist.set_xlabel("confidence (top-1 probability)")
    hist.set_ylabel("images")
    fig.tight_layout()
    return fig


def _merge_last(values: np.ndarray) -> np.ndarray:
    out = values[:-1].copy()
    out[-1] += values[-1]
    return out


# ---------------------------------------------------------------------------- lit-ft calibrate
def collect_logits(trainer: Any, model: Any, datamodule: Any, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, labels)`` of a split, as the model's validate/test step computes them
    (divided by the model's current temperature), run by ``trainer`` (its devices and precision)."""
    from lightning.pytorch.callbacks import Callback

    class _Collect(Callback):
        def __init__(self) -> None:
            self.logits: list[torch.Tensor] = []
            self.labels: list[torch.Tensor] = []

        def _keep(self, outputs: Any, batch: Any) -> None:
            self.logits.append(outputs["logits"].detach().float().cpu())
            self.labels.append(batch[1].detach().cpu())

        def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
            self._keep(outputs, batch)

        def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
            self._keep(outputs, batch)

    collect = _Collect()
    trainer.callbacks.append(collect)
    try:
        run = trainer.validate if split == "val" else trainer.test
        run(model, datamodule=datamodule, verbose=False)
    finally:
        trainer.callbacks.remove(collect)
    if not collect.logits:
        raise UserError(f"the {split} split is empty", f"calibration needs labelled {split} images")
    return torch.cat(collect.logits), torch.cat(collect.labels)


def store_temperature(ckpt_path: str, temperature: float, report: Optional[dict] = None) -> None:
    """Write ``temperature`` (and the numbers behind it) into a lit-ft checkpoint file, atomically."""
    from lit_ft.callbacks.checkpointing import atomic_save

    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    state = ckpt.setdefault("lit_ft", {})
    state["temperature"] = float(temperature)
    if report is not None:
        state["calibration"] = report
    atomic_save(ckpt, ckpt_path)


def calibrate_command(cli: "LitFTCLI", max_iter: int = 100, n_bins: int = DEFAULT_BINS, test: bool = True) -> None:
    """Fit a temperature on validation logits and store it in the checkpoint.

    Temperature scaling (Guo et al. 2017): one scalar T divides the logits so that the
    validation NLL is lowest; predictions (argmax) never change. ``lit-ft test``/``predict``
    with this checkpoint then report and write calibrated probabilities. Prints NLL and ECE
    before/after on the validation and test splits.

    Args:
        max_iter: LBFGS iterations.
        n_bins: confidence bins of the expected calibration error.
        test: also report the test split (when the data has one).
    """
    ckpt = cli.config.get("ckpt_path")
    if not ckpt:
        raise UserError("calibrate needs a trained model", "pass --ckpt_path best (or last, or a .ckpt file)")
    calibrate_checkpoint(cli.model, cli.datamodule, cli.trainer, ckpt, max_iter, n_bins, test)


def calibrate_checkpoint(
    model: Any, datamodule: Any, trainer: Any, ckpt: str, max_iter: int = 100, n_bins: int = DEFAULT_BINS, test: bool = True
) -> float:
    """Fit the temperature of ``model`` (holding ``ckpt``'s weights) on validation logits, print
    NLL/ECE before and after, store it in ``ckpt``; returns it. (``lit-ft calibrate`` and
    ``fit --calibrate_after_fit`` both run this.)"""
    dm = datamodule
    if trainer.world_size > 1:  # each rank would fit its own shard's temperature
        raise UserError("calibrate runs on one device", "pass --trainer.devices 1 (one scalar is fitted in seconds)")
    model.temperature.fill_(1.0)  # fit on the raw logits, also when re-calibrating
    val_logits, val_labels = collect_logits(trainer, model, dm, "val")
    t = fit_temperature(val_logits, val_labels, max_iter)
    rows = [calibration_numbers("validation", val_logits, val_labels, t, n_bins)]
    if test:
        try:
            test_logits, test_labels = collect_logits(trainer, model, dm, "test")
        except UserError as err:  # e.g. data without a test split: report validation only
            print(f"lit-ft calibrate: no test numbers ({err.problem})", flush=True)
        else:
            rows.append(calibration_numbers("test", test_logits, test_labels, t, n_bins))
    model.temperature.fill_(t)
    if trainer.is_global_zero:
        store_temperature(ckpt, t, {"temperature": t, "n_bins": n_bins, "splits": [asdict(r) for r in rows]})
        print(f"lit-ft calibrate: {Path(ckpt)}\n{format_numbers(t, rows)}\nlit-ft: temperature stored in {ckpt}",
              flush=True)
    return t

"""Robustness report: a model's test accuracy under every corruption and severity.

    lit-ft robustness -c configs/experiments/_base.yaml -c configs/experiments/lp_ft.yaml --ckpt_path best --subset 2000

Owns: the evaluation grid (:func:`robustness_report`), its summary (mean corruption accuracy,
per corruption and per severity), its table (``robustness.md`` / ``.csv``), its TensorBoard
scalars and the ``lit-ft robustness`` command. The corruptions themselves and the shifted test
split are :mod:`lit_ft.data.corruptions`'s (the datamodule's ``shift`` option); each cell of
the grid is one ``Trainer.test`` with the classifier's own metrics.

The clean accuracy is measured twice: on the full test split (the number to quote) and on the
same subset the corruptions use (the baseline the corrupted accuracies compare with). The mean
corruption accuracy is the plain mean over every (corruption, severity) cell evaluated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

from lit_ft.data.corruptions import CORRUPTIONS, SEVERITIES, CorruptionName, Shift
from lit_ft.errors import UserError
from lit_ft.experiment import evaluate, evaluation_options
from lit_ft.tables import markdown, write_tables

if TYPE_CHECKING:
    from lit_ft.cli import LitFTCLI


@dataclass
class RobustnessReport:
    """Accuracies of one model on the clean and the shifted test sets.

    Attributes:
        clean_acc: on the full test split (None if not measured).
        clean_subset_acc: on the images the corruptions use (equal to ``clean_acc`` without a subset).
        acc: ``{(corruption, severity): accuracy}``.
        subset: images per shifted test set (None: all).
        seed: seed of the corruptions' draws.
    """

    clean_acc: Optional[float]
    clean_subset_acc: float
    acc: dict[tuple[str, int], float] = field(default_factory=dict)
    subset: Optional[int] = None
    seed: int = 0

    @property
    def mean_corruption_acc(self) -> float:
        """Mean accuracy over every (corruption, severity) evaluated."""
        return sum(self.acc.values()) / len(self.acc) if self.acc else float("nan")

    @property
    def corruptions(self) -> list[str]:
        return list(dict.fromkeys(c for c, _ in self.acc))

    @property
    def severities(self) -> list[int]:
        return sorted({s for _, s in self.acc})

    def per_corruption(self) -> dict[str, float]:
        """Mean accuracy of each corruption over its severities."""
        return {c: _mean([a for (cc, _), a in self.acc.items() if cc == c]) for c in self.corruptions}

    def per_severity(self) -> dict[int, float]:
        """Mean accuracy of each severity over the corruptions."""
        return {s: _mean([a for (_, ss), a in self.acc.items() if ss == s]) for s in self.severities}

    def rows(self) -> list[dict[str, Any]]:
        """One row per corruption (accuracy per severity, mean), then the mean over corruptions."""
        rows = []
        for c in self.corruptions:
            row: dict[str, Any] = {"corruption": c}
            row.update({f"s{s}": self.acc.get((c, s)) for s in self.severities})
            row["mean"] = self.per_corruption()[c]
            rows.append(row)
        mean_row: dict[str, Any] = {"corruption": "mean"}
        mean_row.update({f"s{s}": a for s, a in self.per_severity().items()})
        mean_row["mean"] = self.mean_corruption_acc
        return rows + [mean_row]

    def summary(self) -> str:
        full = f"clean test accuracy {self.clean_acc:.4f} (all images); " if self.clean_acc is not None else ""
        n = f"{self.subset} test images per shifted set" if self.subset else "every test image in each shifted set"
        return (f"{full}clean {self.clean_subset_acc:.4f} and mean corruption accuracy {self.mean_corruption_acc:.4f} "
                f"on {n} (corruption seed {self.seed})")

    def table(self) -> str:
        return markdown(self.rows())

    def save(self, stem: Union[str, Path]) -> tuple[Path, Path]:
        """``<stem>.md`` and ``<stem>.csv``."""
        return write_tables(Path(stem), "lit-ft robustness", self.rows(), self.summary() + ".")

    def log(self, logger: Any, step: int = 0) -> None:
        """TensorBoard scalars ``robustness/<corruption>`` (x axis: severity), the means and the
        clean accuracies, and the table as text. ``logger``: a Lightning TensorBoardLogger or a
        ``SummaryWriter``; anything else is ignored."""
        writer = getattr(logger, "experiment", logger)
        if not hasattr(writer, "add_scalar"):
            return
        for (c, s), a in self.acc.items():
            writer.add_scalar(f"robustness/{c}", a, s)
        for s, a in self.per_severity().items():
            writer.add_scalar("robustness/mean_by_severity", a, s)
        writer.add_scalar("robustness/mean_corruption_acc", self.mean_corruption_acc, step)
        writer.add_scalar("robustness/clean_subset_acc", self.clean_subset_acc, step)
        if self.clean_acc is not None:
            writer.add_scalar("robustness/clean_acc", self.clean_acc, step)
        if hasattr(writer, "add_text"):
            writer.add_text("robustness/table", self.summary() + "\n\n" + self.table(), step)
        if hasattr(writer, "flush"):
            writer.flush()


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def robustness_report(
    model: Any,
    datamodule: Any,
    corruptions: Optional[Sequence[str]] = None,
    severities: Sequence[int] = SEVERITIES,
    subset: Optional[int] = None,
    seed: int = 0,
    clean: bool = True,
    **trainer_kwargs: Any,
) -> RobustnessReport:
    """Test ``model`` on the clean test split and on every (corruption, severity).

    Args:
        model: a classifier (e.g. :func:`lit_ft.experiment.load_run`).
        datamodule: any lit-ft datamodule with a test split; its ``shift`` is set for each cell
            and put back afterwards.
        corruptions: names from :data:`~lit_ft.data.corruptions.CORRUPTIONS` (default: all).
        severities: 1..5 (default: all).
        subset: test each shifted set on this many images (a fixed stratified sample); the clean
            accuracy is also measured on the full split.
        seed: seed of the corruptions' random draws.
        clean: also measure the clean accuracy on the full test split.
        **trainer_kwargs: options of the quiet evaluation ``Trainer`` (e.g. ``accelerator``).
    """
    corruptions = list(CORRUPTIONS if corruptions is None else corruptions)
    unknown = [c for c in corruptions if c not in CORRUPTIONS]
    if unknown or not corruptions:
        raise UserError(f"unknown corruption(s) {unknown}" if unknown else "no corruptions to test",
                        f"choose from {', '.join(CORRUPTIONS)}")
    if not severities or any(s not in SEVERITIES for s in severities):
        raise UserError(f"severities must be in 1..5, got {list(severities)}", "e.g. [1, 3, 5]")
    before = datamodule.shift
    try:
        def test(shift: Optional[Shift]) -> float:
            datamodule.shift = shift
            return evaluate(model, datamodule, split="test", **trainer_kwargs)["test/acc"]

        clean_acc = test(None) if clean else None
        clean_subset = test(Shift("none", seed=seed, subset=subset)) if subset or not clean else clean_acc
        acc = {(c, s): test(Shift(c, s, seed, subset)) for c in corruptions for s in severities}  # type: ignore[arg-type]
    finally:
        datamodule.shift = before
    return RobustnessReport(clean_acc, float(clean_subset), acc, subset, seed)


def robustness_command(
    cli: "LitFTCLI",
    corruptions: Optional[list[CorruptionName]] = None,
    severities: list[int] = list(SEVERITIES),
    subset: Optional[int] = None,
    seed: int = 0,
    out: Optional[str] = None,
) -> None:
    """Test a trained model under distribution shift: every corruption at every severity.

    Needs ``--ckpt_path best|last|file``. Writes ``robustness.md``/``.csv`` (accuracy per
    corruption and severity, mean corruption accuracy, clean accuracy) and logs them to
    TensorBoard (``robustness/*`` in this command's run directory).

    Args:
        corruptions: which corruptions (default: all of gaussian_noise, gaussian_blur, contrast,
            brightness, rotation, translation, jpeg_compression, pixelate).
        severities: which severities, 1 (mild) to 5 (strong).
        subset: test each shifted set on a fixed, class-stratified sample of this many test
            images (the clean accuracy is also measured on every test image).
        seed: seed of the corruptions' random draws (the same seed, the same shifted images).
        out: the table's path without suffix; default ``<log_dir>/robustness``.
    """
    if not cli.config.get("ckpt_path"):
        raise UserError("lit-ft robustness tests a trained model", "pass --ckpt_path best, last or a .ckpt file")
    report = robustness_report(cli.model, cli.datamodule, corruptions, severities, subset, seed, **evaluation_options(cli.config))
    md, _ = report.save(Path(out) if out else Path(cli.trainer.log_dir or ".") / "robustness")
    report.log(cli.trainer.logger)
    print(report.table(), flush=True)
    print(f"lit-ft: {report.summary()}; wrote {md} and {md.with_suffix('.csv')}", flush=True)

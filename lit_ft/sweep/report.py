"""What a sweep reports: the trial table (markdown + CSV), one TensorBoard HPARAMS session per
trial, Optuna's matplotlib plots, and the progress line.

Reads finished trials only (Optuna ``FrozenTrial`` objects, one per slot = run directory); it
never changes the study. Files are written whole and renamed into place, so several sweep
processes sharing a directory never leave a half-written table.
"""

from __future__ import annotations

import csv
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from lit_ft.sweep.study import EPOCHS, REASON, WALL, best_value, interrupted


@dataclass
class Row:
    """One slot (run directory) of the sweep, as its latest attempt left it."""

    slot: int
    number: int
    state: str
    value: Optional[float]
    epochs: int
    wall_s: float
    params: dict[str, Any]
    reason: str
    attempts: int

    @property
    def run_dir(self) -> str:
        return f"trial_{self.slot}"


def rows(latest: Mapping[int, Any], attempts: Mapping[int, Sequence[Any]], maximize: bool) -> list[Row]:
    """Table rows from each slot's latest trial (and all its attempts, for the wall time); a
    pruned or failed trial shows the best value it reached."""
    out = []
    for slot, t in latest.items():
        tries = attempts.get(slot, [t])
        state = t.state.name
        reason = str(t.user_attrs.get(REASON, ""))
        if state == "FAIL" and interrupted(t):
            state = "INTERRUPTED"
        value = t.value if state == "COMPLETE" else best_value(t.intermediate_values, maximize)
        epochs = int(t.user_attrs.get(EPOCHS, len(t.intermediate_values)) or len(t.intermediate_values))
        out.append(Row(slot, t.number, state, value, epochs, sum(float(a.user_attrs.get(WALL, 0.0)) for a in tries),
                       dict(t.params), reason, len(tries)))
    return out


def table(rows_: Sequence[Row], metric: str, keys: Sequence[str]) -> tuple[str, str]:
    """(markdown, CSV) of the trials, in trial order."""
    head = ["trial", "state", metric, "epochs", "wall", *keys, "note"]
    md = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["trial", "optuna_trial", "state", metric, "epochs", "wall_s", *keys, "attempts", "note"])
    for r in rows_:
        value = f"{r.value:.4f}" if r.value is not None else "-"
        note = r.reason + (f" ({r.attempts} attempts)" if r.attempts > 1 else "")
        cells = [str(r.slot), r.state, value, str(r.epochs), _clock(r.wall_s), *(_short(r.params.get(k)) for k in keys), note]
        md.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
        w.writerow([r.slot, r.number, r.state, "" if r.value is None else r.value, r.epochs, round(r.wall_s, 1),
                    *("" if r.params.get(k) is None else r.params.get(k) for k in keys), r.attempts, note])
    return "\n".join(md) + "\n", buf.getvalue()


def pruning_savings(rows_: Sequence[Row], max_epochs: Mapping[int, int]) -> Optional[str]:
    """How much compute pruning saved: epochs not trained, as a share of the sweep run unpruned."""
    pruned = [r for r in rows_ if r.state == "PRUNED"]
    done = [r for r in rows_ if r.state in ("COMPLETE", "PRUNED")]
    if not done:
        return None
    trained = sum(r.epochs for r in done)
    full = sum(max(max_epochs.get(r.slot, r.epochs), r.epochs) for r in done)
    saved = full - trained
    if not pruned:
        return f"no trial was pruned ({trained} epochs trained)"
    per_epoch = [r.wall_s / r.epochs for r in done if r.epochs]
    minutes = saved * (sum(per_epoch) / len(per_epoch)) / 60 if per_epoch else 0.0
    return (f"pruning stopped {len(pruned)} of {len(done)} trials early: {trained} epochs trained instead of {full} "
            f"({100 * saved / full:.0f}% saved, ~{minutes:.0f} min at this sweep's mean time per epoch)" if full else None)


def write_text(path: Path, text: str) -> None:
    """Write ``path`` whole, atomically (several sweep processes may share the directory)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_hparams(directory: Path, row: Row, metric: str) -> None:
    """One TensorBoard HPARAMS session for a finished slot (the sampled keys, its state, result)."""
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams

    params = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in row.params.items()}
    params["state"] = row.state
    metrics = {f"sweep/{metric}": float("nan") if row.value is None else float(row.value),
               "sweep/epochs": float(row.epochs), "sweep/wall_minutes": row.wall_s / 60}
    writer = SummaryWriter(str(directory / row.run_dir))
    try:
        for summary in hparams(params, metrics):
            writer.file_writer.add_summary(summary)
        for tag, value in metrics.items():
            writer.add_scalar(tag, value, 0)
    finally:
        writer.close()


def write_plots(study: Any, directory: Path) -> list[str]:
    """Optuna's matplotlib plots as PNG; returns a note for each plot that could not be drawn."""
    import matplotlib

    matplotlib.use("Agg")  # a CLI process: no display
    import matplotlib.pyplot as plt
    from optuna.exceptions import ExperimentalWarning
    from optuna.visualization import matplotlib as vis

    directory.mkdir(parents=True, exist_ok=True)
    notes = []
    plots = {
        "history": vis.plot_optimization_history,
        "importances": vis.plot_param_importances,
        "parallel_coordinate": vis.plot_parallel_coordinate,
        "intermediate_values": vis.plot_intermediate_values,
    }
    for name, fn in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ExperimentalWarning)
                warnings.simplefilter("ignore", UserWarning)
                ax = fn(study)
            fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
            fig.set_size_inches(9, 5.5)
            fig.tight_layout()
            fig.savefig(directory / f"{name}.png", dpi=110)
            plt.close(fig)
        except Exception as err:  # e.g. importances need 2 complete trials with different values
            notes.append(f"{name}: not drawn ({str(err).splitlines()[0] if str(err) else type(err).__name__})")
            plt.close("all")
    return notes


def progress(row: Row, metric: str, done: int, budget: Optional[int], best: Optional[Row], eta_s: Optional[float]) -> str:
    """``lit-ft sweep: trial 3 COMPLETE val/acc=0.8712 after 4 epochs in 5:12 | 4 of 16 done, best ... | ETA 0:48:00``."""
    value = f" {metric}={row.value:.4f}" if row.value is not None else ""
    why = f" ({row.reason})" if row.state in ("FAIL", "PRUNED") and row.reason else ""
    parts = [f"lit-ft sweep: trial {row.slot} {row.state}{value} after {row.epochs} epochs in {_clock(row.wall_s)}{why}",
             f"{done} of {budget if budget is not None else '?'} done"]
    if best is not None:
        parts[-1] += f", best {metric}={best.value:.4f} (trial {best.slot})"
    if eta_s is not None:
        parts.append(f"ETA {_clock(eta_s)}")
    return " | ".join(parts)


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _short(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)

"""The CLI's record of a run: its resolved config (file + TensorBoard text), its key values and
final metrics for TensorBoard's HPARAMS tab, and the metrics of its best checkpoint."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Optional

import lightning as L
import torch
import yaml
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_warn

from lit_ft.callbacks.figures import summary_writer

CONFIG_TAG = "lit-ft/config"
# Config entries that describe plumbing, not the experiment (objects, or logged elsewhere).
_SKIP_PREFIXES = ("config", "trainer.logger", "trainer.callbacks", "trainer.plugins", "trainer.profiler")
_EXPERIMENT_KEYS = ("seed_everything", "trainer", "model", "data", "ckpt_path", "test_after_fit")


def flatten_config(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """The experiment's key values as ``{"model.backbone": "resnet18", ...}`` for hparams.

    ``class_path``/``init_args`` pairs become ``key = ShortClassName`` plus ``key.arg = value``;
    lists become strings; ``None`` values and plumbing (logger, callbacks, callback sections
    such as ``checkpoint``) are left out.
    """
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if not prefix and key not in _EXPERIMENT_KEYS:
            continue
        if any(name == p or name.startswith(p + ".") for p in _SKIP_PREFIXES):
            continue
        if isinstance(value, Mapping) and "class_path" in value:
            out[name] = str(value["class_path"]).rsplit(".", 1)[-1]
            out.update(flatten_config(value.get("init_args") or {}, name + "."))
        elif isinstance(value, Mapping):
            out.update(flatten_config(value, name + "."))
        elif value is None:
            continue
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = str(value)
    return out


def scalar_metrics(metrics: Mapping[str, Any], prefix: str) -> dict[str, float]:
    """``{name: float}`` of the one-element metrics whose name starts with ``prefix``."""
    out = {}
    for k, v in metrics.items():
        if k.startswith(prefix) and (not isinstance(v, torch.Tensor) or v.numel() == 1):
            out[k] = float(v)
    return out


def given_config_files(config: Any) -> set[Path]:
    """The absolute paths of the ``--config`` files a parsed CLI config came from."""
    found = config.get("config") if hasattr(config, "get") else None
    paths = set()
    for p in found or []:
        if p is None:
            continue
        paths.add(Path(os.fspath(getattr(p, "absolute", None) or str(p))).resolve())  # jsonargparse's Path, or a str
    return paths


class RunRecord(SaveConfigCallback):
    """Saves ``config.yaml`` in the run directory (as LightningCLI does) and also:

    * logs the resolved config as TensorBoard text ``lit-ft/config``;
    * at the end of ``fit`` writes the config's key values (:func:`flatten_config`) with the
      final metrics as TensorBoard hparams: ``hp/val/<metric>`` (last validation),
      ``hp/best/<monitor>`` (best checkpoint) and, with ``test_after_fit``, ``hp/test/<metric>``;
      the HPARAMS tab then compares every run under ``runs/`` side by side;
    * remembers the validation metrics of the best checkpoint (:attr:`best_metrics`) for the
      CLI's closing summary line.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.params: dict[str, Any] = {}
        self.best_metrics: dict[str, float] = {}
        self._best_path: Optional[str] = None
        self._last_val: dict[str, float] = {}
        self._hparams_written = False

    # ------------------------------------------------------------------ config
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Without a logger the run directory is ``default_root_dir`` (the working directory by
        # default), where the user's own config often is: ``lit-ft test -c config.yaml
        # --trainer.logger false`` would replace it, comments gone and the command line's
        # overrides baked in. A config file given on the command line is never written over.
        if self.save_to_log_dir and not self.already_saved:
            target = Path(trainer.log_dir or ".", self.config_filename).resolve()
            if target in given_config_files(self.config):
                rank_zero_warn(
                    f"lit-ft: not saving the resolved config to {target}: that is the config file you gave. "
                    "HINT: keep a logger on, or set --trainer.default_root_dir to a run directory"
                )
                self.save_to_log_dir = False
        super().setup(trainer, pl_module, stage)

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        text = self.parser.dump(self.config, skip_none=False)
        self.params = flatten_config(yaml.safe_load(text) or {})
        writer = summary_writer(trainer)
        if writer is not None:
            # Indented lines render as preformatted text in TensorBoard's markdown.
            writer.add_text(CONFIG_TAG, "\n".join("    " + line for line in text.splitlines()), trainer.global_step)

    # ------------------------------------------------------------------ best checkpoint
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._best_path = _best_path(trainer)  # a best restored from a resumed run is not ours to describe

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        # Checkpoint callbacks run after this one, so a best they chose last time is matched with
        # the metrics of last time before those are replaced.
        self._note_best(trainer)
        self._last_val = {**scalar_metrics(trainer.callback_metrics, "val/"), "epoch": trainer.current_epoch}

    def _note_best(self, trainer: L.Trainer) -> None:
        path = _best_path(trainer)
        if path and path != self._best_path:
            self._best_path = path
            self.best_metrics = dict(self._last_val)

    def best_summary(self, exclude: tuple[str, ...] = ()) -> str:
        """``val/f1=0.88 val/loss=0.31 ... (epoch 3)`` for the best checkpoint, or ``""``.

        Args:
            exclude: metric names to leave out (e.g. the monitor, printed separately).
        """
        metrics = {k: v for k, v in self.best_metrics.items() if k != "epoch" and k not in exclude}
        if not metrics:
            return ""
        text = " ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()))
        return f"{text} (epoch {self.best_metrics['epoch']})" if "epoch" in self.best_metrics else text

    # ------------------------------------------------------------------ hparams
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._note_best(trainer)
        writer = summary_writer(trainer)
        if writer is None or not self.params:
            return
        metrics = {f"hp/{k}": v for k, v in scalar_metrics(trainer.callback_metrics, "val/").items()}
        cb = trainer.checkpoint_callback
        score = getattr(cb, "best_model_score", None)
        if score is not None and getattr(cb, "monitor", None):
            metrics[f"hp/best/{cb.monitor}"] = float(score)
        declared = dict(metrics)
        if self.params.get("test_after_fit"):
            names = sorted(getattr(pl_module, "test_metrics", {}).keys()) or ["test/acc"]
            declared.update({f"hp/{k}": float("nan") for k in ["test/loss", *names]})
        if not declared:
            return
        from torch.utils.tensorboard.summary import hparams

        # Written straight to the event file (what TensorBoardLogger.log_hyperparams does) so the
        # logger's hparams.yaml stays the model's arguments, loadable by load_from_checkpoint.
        exp, ssi, sei = hparams(self.params, declared)
        file_writer = writer._get_file_writer()
        for summary in (exp, ssi, sei):
            file_writer.add_summary(summary, trainer.global_step)
        for tag, value in metrics.items():
            writer.add_scalar(tag, value, trainer.global_step)
        writer.flush()
        self._hparams_written = True

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        writer = summary_writer(trainer)
        if writer is None or not self._hparams_written:
            return
        for k, v in scalar_metrics(trainer.callback_metrics, "test/").items():
            writer.add_scalar(f"hp/{k}", v, trainer.global_step)
        writer.flush()


def _best_path(trainer: L.Trainer) -> str:
    cb = trainer.checkpoint_callback
    return str(getattr(cb, "best_model_path", "") or "") if cb is not None else ""

"""Model soups (Wortsman et al. 2022, arXiv 2203.05482): average the weights of several runs
fine-tuned from the same starting point.

    lit-ft soup -c configs/experiments/_base.yaml --ckpt a.ckpt b.ckpt c.ckpt --method greedy --out soup.ckpt
    lit-ft soup -c configs/experiments/_base.yaml --ckpt 'runs/sweep/*/checkpoints/best-*.ckpt'

Owns: which checkpoints may go into one soup (:func:`check_compatible`), the uniform and greedy
recipes (:func:`make_soup`), the ``lit-ft soup`` command and its table. The arithmetic and the
BatchNorm recalibration are :mod:`lit_ft.weight_space`'s; evaluation is Lightning's
``Trainer.validate`` with the classifier's own metrics (:func:`lit_ft.experiment.evaluate`).

The recipes:

* ``uniform``: the average of every ingredient.
* ``greedy``: ingredients ranked by their own validation accuracy; the soup starts as the best
  one (unchanged) and each next one is kept only if the soup's validation accuracy with it is not
  lower than without it. The soup therefore never scores below its best ingredient on the
  validation split (the paper's held-out set; it is also the split that ranks the runs, so
  report the soup on the test split).

After averaging (a soup of two or more), BatchNorm running statistics are recomputed on
``bn_batches`` batches of training images under the eval transform (``bn_batches: 0`` keeps
the averaged statistics): averaged statistics do not describe an averaged network, and BN
networks lose a soup's gain without this (arXiv 2301.10092). A BN layer whose statistics are
the same in every ingredient keeps them: it was frozen in every run (a frozen group, a
linear-probe phase, ``freeze_bn_stats``), so the layers after it learnt against exactly those
statistics (in a soup of two EfficientNet-Lite0 linear probes, `benchmarks/soup_bench.py --smoke`,
recomputing them took the validation accuracy from 37% to 19%).

Ingredients must share what the soup's arithmetic assumes: the backbone, the classes, the
starting weights (the same ``pretrained`` source and ``head_init``), every tensor's name and
shape, and the preprocessing they were evaluated with. Runs from random weights
(``pretrained: false``) are accepted with a warning: nothing in a checkpoint says whether they
began from the same random draw. The ``--sweep runs/<sweep> --top K`` form (ingredients from a
``lit-ft sweep``) is not implemented yet: pass the sweep's checkpoints with ``--ckpt``.
"""

from __future__ import annotations

import glob
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Mapping, Optional, Sequence, Union

import torch

from lit_ft import weight_space as W
from lit_ft.errors import UserError
from lit_ft.experiment import evaluation_options
from lit_ft.models import ImageClassifier
from lit_ft.tables import markdown, write_tables
from lit_ft.weight_space import WeightEvaluator

if TYPE_CHECKING:
    from lit_ft.cli import LitFTCLI

PathLike = Union[str, Path]
Method = Literal["uniform", "greedy"]
#: What the ingredients of one soup must agree on (model hyperparameters).
SAME_START = ("backbone", "pretrained", "head_init")


@dataclass(eq=False)
class Ingredient:
    """One checkpoint of a soup."""

    path: str
    checkpoint: dict[str, Any] = field(repr=False)
    val_acc: Optional[float] = None  # its own validation accuracy, measured here

    @property
    def hparams(self) -> dict[str, Any]:
        return dict(self.checkpoint.get("hyper_parameters") or {})

    @property
    def state(self) -> dict[str, torch.Tensor]:
        return self.checkpoint["state_dict"]


def load_ingredients(paths: Sequence[PathLike]) -> list[Ingredient]:
    """Read checkpoints (``weights_only=True``) and check that they can go into one soup."""
    if not paths:
        raise UserError("no checkpoints for the soup", "pass them with --ckpt a.ckpt b.ckpt ...")
    seen: dict[str, str] = {}
    for p in paths:
        key = str(Path(p).resolve())
        if key in seen:
            raise UserError(f"{p} is given twice", "each checkpoint goes into a soup once")
        seen[key] = str(p)
    ingredients = [Ingredient(str(p), W.read_checkpoint(p)) for p in paths]
    check_compatible(ingredients)
    return ingredients


def check_compatible(ingredients: Sequence[Ingredient]) -> None:
    """Raise one :class:`UserError` naming the first thing two ingredients disagree on.

    Compared: backbone, classes, starting weights (``pretrained``, ``head_init``), tensor names
    and shapes, and the trained preprocessing. Warns when the runs started from random weights.
    """
    first = ingredients[0]
    hint = ("a soup averages runs fine-tuned from the same starting weights: the same backbone, classes, "
            "pretrained weights and head_init (learning rate, augmentation, seed, epochs may differ)")
    for other in ingredients[1:]:
        for key in SAME_START:
            a, b = _start_value(first, key), _start_value(other, key)
            if a != b:
                raise UserError(f"{other.path} cannot go into a soup with {first.path}: {key} {b!r} vs {a!r}", hint)
        a, b = _classes(first), _classes(other)
        if a != b:
            raise UserError(f"{other.path} cannot go into a soup with {first.path}: classes {_short(b)} vs {_short(a)}", hint)
        ka, kb = set(first.state), set(other.state)
        if ka != kb:
            k = min(ka ^ kb)
            raise UserError(f"{other.path} cannot go into a soup with {first.path}: tensor {k} is only in "
                            f"{first.path if k in ka else other.path}", hint)
        for k, v in first.state.items():
            if tuple(v.shape) != tuple(other.state[k].shape):
                raise UserError(f"{other.path} cannot go into a soup with {first.path}: {k} has shape "
                                f"{tuple(other.state[k].shape)} vs {tuple(v.shape)}", hint)
        a, b = _preprocessing(first), _preprocessing(other)
        if a != b:
            raise UserError(
                f"{other.path} cannot go into a soup with {first.path}: trained with preprocessing {b} vs {a}",
                "the soup is evaluated with one preprocessing: use runs with the same image_size, mean, std, interpolation and crop",
            )
    if any(_start_value(i, "pretrained") in (False, None) for i in ingredients) and len(ingredients) > 1:
        warnings.warn(
            "lit-ft: the soup's runs started from random weights (pretrained: false); averaging only makes sense "
            "if they began from the same random draw, which a checkpoint cannot show",
            stacklevel=2,
        )


def _start_value(ing: Ingredient, key: str) -> Any:
    value = ing.hparams.get(key)
    if key == "pretrained" and isinstance(value, str) and Path(value).expanduser().is_file():
        return str(Path(value).expanduser().resolve())  # one file, however its path was written
    if key == "head_init" and value is None:
        return "zeros"  # the classifier's default
    return value


def _classes(ing: Ingredient) -> Optional[list]:
    names = ing.hparams.get("class_names") or (ing.checkpoint.get("lit_ft") or {}).get("class_names")
    return list(names) if names else None


def _preprocessing(ing: Ingredient) -> dict[str, Any]:
    cfg = (ing.checkpoint.get("lit_ft") or {}).get("data_config") or {}
    keys = ("input_size", "mean", "std", "interpolation", "crop_pct", "grayscale_to_rgb")
    return {k: (list(cfg[k]) if isinstance(cfg.get(k), (list, tuple)) else cfg.get(k)) for k in keys if k in cfg}


def _short(names: Optional[list], n: int = 4) -> str:
    if names is None:
        return "(unknown)"
    return "[" + ", ".join(map(str, names[:n])) + (", ..." if len(names) > n else "") + f"] ({len(names)})"


# ---------------------------------------------------------------------------- the recipes


@dataclass
class SoupResult:
    """What :func:`make_soup` returns.

    Attributes:
        model: the classifier holding the soup's weights (eval mode).
        checkpoint: the soup as an ordinary lit-ft checkpoint (see :meth:`save`).
        val_acc: the soup's validation accuracy.
        rows: the table of what went in (one row per ingredient, then the soup).
    """

    model: ImageClassifier
    checkpoint: dict[str, Any]
    val_acc: float
    rows: list[dict[str, Any]]
    method: str

    def save(self, path: PathLike) -> Path:
        """Write the soup checkpoint (atomically) and its table beside it (``.md``, ``.csv``)."""
        path = W.save_checkpoint(self.checkpoint, path)
        provenance = self.checkpoint["lit_ft"]["soup"]
        notes = (f"{self.method} soup of {len(provenance['ingredients'])} of {len(self.rows) - 1} checkpoints; "
                 f"BatchNorm statistics {provenance['bn']}. Validation accuracy {self.val_acc:.4f}. "
                 f"Checkpoint: {path}")
        write_tables(path.with_suffix(""), "lit-ft soup", self.rows, notes)
        return path

    def table(self) -> str:
        """The table of what went in, as markdown."""
        return markdown(self.rows)


def make_soup(
    checkpoints: Sequence[PathLike],
    datamodule: Any,
    method: Method = "greedy",
    bn_batches: int = 32,
    device: Optional[Union[str, torch.device]] = None,
    **trainer_kwargs: Any,
) -> SoupResult:
    """A uniform or greedy soup of ``checkpoints``, judged on ``datamodule``'s validation split.

    Args:
        checkpoints: lit-ft ``.ckpt`` files fine-tuned from the same starting weights.
        datamodule: a lit-ft datamodule with training images (for BN statistics) and a
            validation split (to rank and choose ingredients).
        method: ``uniform`` or ``greedy`` (see the module docstring).
        bn_batches: batches (of ``eval_batch_size`` training images) over which BatchNorm
            statistics are recomputed after averaging; 0 keeps the averaged statistics.
        device: where BN statistics are recomputed (default: CUDA if available, else CPU).
        **trainer_kwargs: options of the quiet evaluation ``Trainer`` (e.g. ``accelerator``).

    Raises:
        UserError: incompatible checkpoints, data of other classes, no validation split.
    """
    if method not in ("uniform", "greedy"):
        raise UserError(f"unknown soup method {method!r}", "use uniform or greedy")
    if bn_batches < 0:
        raise UserError(f"bn_batches must be >= 0, got {bn_batches}", "0 keeps the averaged BatchNorm statistics")
    ingredients = load_ingredients(checkpoints)
    model = ImageClassifier.load_from_checkpoint(ingredients[0].path, map_location="cpu", weights_only=True, pretrained=False)
    model.eval()
    W.prepare_data(datamodule, model, ingredients[0].path, _classes(ingredients[0]))
    judge = WeightEvaluator(model, datamodule, bn_batches, device, trainer_kwargs)

    for ing in ingredients:
        ing.val_acc = judge.accuracy(ing.state)
    # Best first; a stable sort keeps the given order between equals.
    ranked = sorted(ingredients, key=lambda i: -float(i.val_acc))
    tried: dict[str, Optional[float]] = {i.path: None for i in ranked}
    if method == "uniform":
        kept = list(ranked)
        val_acc = judge.accuracy(W.average([i.state for i in kept]), [i.state for i in kept])
        state = W.snapshot(model)  # with its recomputed BN statistics
    else:
        kept = [ranked[0]]
        state, val_acc = ranked[0].state, float(ranked[0].val_acc)
        for ing in ranked[1:]:
            acc = judge.accuracy(W.average([i.state for i in kept + [ing]]), [i.state for i in kept + [ing]])
            tried[ing.path] = acc
            if acc >= val_acc:
                kept.append(ing)
                state, val_acc = W.snapshot(model), acc
        model.load_state_dict(state)
    model.eval()

    varying = _varying_hparams(ranked)
    rows = []
    for rank, ing in enumerate(ranked, 1):
        rows.append({
            "rank": rank, "checkpoint": ing.path, "val_acc": float(ing.val_acc),
            "in_soup": ing in kept, "soup_val_acc_with_it": tried[ing.path] if method == "greedy" else None,
            "differs_in": ", ".join(f"{k}={v}" for k, v in varying[ing.path].items()) or None,
        })
    rows.append({"rank": None, "checkpoint": f"{method} soup ({len(kept)})", "val_acc": val_acc, "in_soup": None,
                 "soup_val_acc_with_it": None, "differs_in": None})
    bn = judge.bn_description([i.state for i in kept])
    provenance = {
        "method": method, "bn": bn, "val_acc": val_acc,
        "ingredients": [{"path": i.path, "val_acc": float(i.val_acc)} for i in kept],
        "rejected": [{"path": i.path, "val_acc": float(i.val_acc), "soup_val_acc_with_it": tried[i.path]}
                     for i in ranked if i not in kept],
    }
    checkpoint = W.derived_checkpoint(kept[0].checkpoint, state, "soup", provenance)
    return SoupResult(model, checkpoint, val_acc, rows, method)


def _varying_hparams(ingredients: Sequence[Ingredient]) -> dict[str, dict[str, Any]]:
    """Per ingredient, the model hyperparameters (flattened) whose values differ between ingredients."""
    flat = {i.path: _flatten(i.hparams) for i in ingredients}
    keys = sorted(set().union(*flat.values()))
    varying = [k for k in keys if len({repr(f.get(k)) for f in flat.values()}) > 1]
    return {p: {k: f.get(k) for k in varying} for p, f in flat.items()}


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key.replace("init_args.", "")] = v
    return out


# ---------------------------------------------------------------------------- the command


def soup_command(
    cli: "LitFTCLI",
    ckpt: list[str],
    method: Method = "greedy",
    bn_batches: int = 32,
    out: Optional[str] = None,
) -> None:
    """Average fine-tuned checkpoints into one model (a model soup).

    The data (``--config`` / ``--data``) provides the validation split that ranks and chooses
    the ingredients and the training images for BatchNorm statistics. Writes an ordinary lit-ft
    checkpoint (``lit-ft test --ckpt_path <out>``) and a table of what went in (``.md``,
    ``.csv`` beside it).

    Args:
        ckpt: checkpoints fine-tuned from the same starting weights (same backbone, classes,
            pretrained weights and head_init): ``--ckpt a.ckpt b.ckpt ...`` (a list in YAML), and any
            entry may be a glob pattern in quotes (``'runs/x/*/checkpoints/best-*.ckpt'``).
        method: ``greedy``: best ingredient first, each next kept only if validation accuracy
            does not drop; ``uniform``: the average of all.
        bn_batches: batches of training images (of data.eval_batch_size) over which BatchNorm
            statistics are recomputed after averaging; 0 keeps the averaged statistics.
        out: the soup's checkpoint; default ``<log_dir>/soup.ckpt`` of this command's logger.
    """
    if cli.config.get("ckpt_path"):
        raise UserError("lit-ft soup takes its checkpoints with --ckpt, not --ckpt_path", "e.g. --ckpt a.ckpt b.ckpt")
    result = make_soup(expand_paths(ckpt), cli.datamodule, method, bn_batches, **evaluation_options(cli.config))
    path = result.save(out or Path(cli.trainer.log_dir or ".") / "soup.ckpt")
    print(result.table(), flush=True)
    print(f"lit-ft: {method} soup of {len(result.checkpoint['lit_ft']['soup']['ingredients'])} checkpoints: "
          f"val/acc={result.val_acc:.4f}; wrote {path} and {path.with_suffix('.md')}", flush=True)


def expand_paths(patterns: Union[str, Sequence[str]]) -> list[str]:
    """Checkpoint paths from paths and glob patterns, in the given order (each pattern's matches sorted).

    Raises:
        UserError: a pattern that matches no file.
    """
    out: list[str] = []
    for pattern in [patterns] if isinstance(patterns, str) else list(patterns):
        if any(ch in pattern for ch in "*?["):
            found = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p))
            if not found:
                raise UserError(f"no checkpoint matches {pattern}", "check the pattern (quote it so the shell leaves it alone)")
            out += found
        else:
            out.append(pattern)
    return out

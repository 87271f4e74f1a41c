"""The learning-rate finder: ONE multiplier on every param group's starting LR, swept exponentially.

Owns :func:`lr_find` (the sweep, from Python), :class:`LRFindResult` (the curve, the two
suggestions, the figure, the config override), the pure suggestion rules
(:func:`smooth_losses`, :func:`valley`, :func:`steepest`) and the ``lit-ft lr_find`` command.

Why not Lightning's ``Tuner.lr_find``: it writes one LR into every param group
(``param_group["lr"] = lr``), so layer-wise decay, ``lr_mult``, ``lr_range`` and the
decay/no-decay split would be measured at ratios the run never uses, and it refuses more than
one optimizer. Here the optimizer is built by :func:`lit_ft.optim.build_optimizer` exactly as a
run builds it, and step ``k`` sets every group to ``its own starting LR x m_k``: the swept
value is the *reference* LR (``optimizer.init_args.lr``, or the head's LR for ``lr_range``) and
the other groups follow at the configured ratios.

The loop is our own (a few lines): the loss is the module's
:meth:`~lit_ft.models.classifier.ImageClassifier.step_loss` (task loss + regularizers, mixup
included) on batches of the datamodule's own train loader; the groups that train are those of
the freeze plan's phase (:class:`lit_ft.plan.PlanRunner`). Afterwards the model's weights and
buffers, gradients, ``requires_grad`` flags, module modes and the RNG states are put back
exactly, so a following ``fit`` is bit-identical to one without the sweep (tested). It never
touches a run's optimizer (it builds its own) and leaves the datamodule's loaders alone (each
``train_dataloader()`` call makes a fresh loader whose order is a function of (seed, epoch)).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Literal, Optional, Sequence

import numpy as np
import torch
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lit_ft import optim as O
from lit_ft.errors import UserError
from lit_ft.plan import PlanRunner, TrainingPlan

if TYPE_CHECKING:
    from lit_ft.cli import LitFTCLI
    from lit_ft.models import ImageClassifier

Phase = Literal["head", "all"]
Suggestion = Literal["valley", "steepest"]
# Lightning's LR finder defaults (Tuner.lr_find): 1e-8 .. 1 over 100 steps, stop at 4x the best loss.
MIN_LR, MAX_LR, NUM_STEPS, DIVERGE = 1e-8, 1.0, 100, 4.0
# Skip the first points when looking for the steepest descent: the smoothed loss is still
# settling there, and a spike in the first batches (Lightning#1767) looks like a steep fall after it.
SKIP_BEGIN = 10


# ---------------------------------------------------------------------------- pure rules
def ema(values: Sequence[float], beta: float = 0.98) -> list[float]:
    """fastai/Lightning's bias-corrected exponential moving average: point ``k`` is
    ``sum_i beta^(k-i) (1-beta) v_i / (1 - beta^(k+1))``. Causal: what the sweep can know at
    step ``k`` (its divergence stop uses it, with Lightning's beta 0.98)."""
    out, avg = [], 0.0
    for k, v in enumerate(values):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta ** (k + 1)))
    return out


def smooth_losses(losses: Sequence[float], window: int = 5) -> list[float]:
    """The curve the suggestions read and the figure draws: a centred running median over
    ``window`` points, then a centred running mean over ``window`` points.

    fastai and Lightning suggest from the causal :func:`ema` with beta 0.98 instead. Its lag
    is its window, ~50 steps, i.e. several decades of a 100-step sweep: the curve, its minimum
    and both suggestions land up to a decade to the right of where the loss really fell (seen
    on test_resnet: raw loss lowest at 5e-2, the EMA's minimum at 6e-1). Both windows here are
    centred, so nothing shifts; the median also removes a spike of one or two batches
    (Lightning#1767), which the EMA would carry for dozens of steps and whose slow decay reads
    as a steep descent; and a loss that explodes at the end only touches its own few points.
    """
    half = window // 2
    n = len(losses)
    medians = [float(np.median(losses[max(0, k - half): k + half + 1])) for k in range(n)]
    return [float(np.mean(medians[max(0, k - half): k + half + 1])) for k in range(n)]


def valley(losses: Sequence[float], tolerance: float = 0.01) -> int:
    """fastai's ``valley`` rule: the middle of the longest descent of the smoothed loss (its
    longest decreasing subsequence; fastai picks ``start + third + third/2``, the same point).

    Robust to a noisy curve because it looks at the whole descent, not one slope. One change
    from fastai: a step counts as a descent only if it falls by more than ``tolerance`` of the
    curve's total fall. A zero-initialised head (lit-ft's default) makes every batch start at
    exactly ln C, so at tiny LRs the loss falls by rounding-level amounts for dozens of steps;
    with fastai's strict ``<`` that plateau counts as descent and the suggestion lands decades
    too low (seen: 3e-5 against a working range of 1e-3..1e-1). O(n^2), n ~ 100.
    """
    n = len(losses)
    if n == 0:
        raise ValueError("no losses")
    end_min = int(np.argmin(losses))
    tol = tolerance * (max(losses[: end_min + 1]) - losses[end_min])
    length, start = [1] * n, list(range(n))
    best = 0
    for i in range(1, n):
        for j in range(i):
            # >=: of equally long descents keep the one that starts latest (the end of a plateau).
            if losses[j] - losses[i] > tol and length[j] + 1 >= length[i]:
                length[i], start[i] = length[j] + 1, start[j]
        if length[i] > length[best]:
            best = i
    return start[best] + (best - start[best]) // 2


def steepest(lrs: Sequence[float], losses: Sequence[float], skip_begin: int = SKIP_BEGIN) -> int:
    """Index of the steepest fall of the smoothed loss per decade of LR, searched between
    ``skip_begin`` and the loss minimum (a fall after the minimum is the divergence, not a
    useful LR; a fall right after an early spike is excluded by ``skip_begin``)."""
    n = len(losses)
    end = int(np.argmin(losses)) + 1
    begin = min(skip_begin, max(0, end - 2))
    if end - begin < 2:
        return int(np.argmin(losses))
    x = np.log10(np.asarray(lrs[begin:end], dtype=float))
    y = np.asarray(losses[begin:end], dtype=float)
    grads = np.gradient(y, x)
    return begin + int(np.argmin(grads)) if n else 0


# ---------------------------------------------------------------------------- result
@dataclass
class LRFindResult:
    """What :func:`lr_find` measured.

    Attributes:
        lrs: the reference LR at each step (the value ``key`` would be set to).
        losses: the training loss at each step (regularizers included).
        smoothed: :func:`smooth_losses` of ``losses``.
        group_names: optimizer param-group names (``blocks.3``, ``blocks.3/no_decay``, ...).
        group_lrs: ``[step][group]`` the LR each param group really used.
        valley: the valley suggestion (reference LR).
        steepest: the steepest-descent suggestion (reference LR).
        key: the config key the reference LR is (``model.optimizer.init_args.lr`` or ``model.lr_range``).
        configured: the configured reference LR.
        lr_range: the configured ``lr_range`` (``[low, high]``) when ``key`` is ``model.lr_range``.
        phase: the freeze-plan phase swept (``start``, ``head``, ``all``) and its groups.
        trainable: names of the layer groups that trained (received gradients).
        stopped_early: the loss diverged before the last step.
    """

    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    group_names: list[str]
    group_lrs: list[list[float]]
    valley: float
    steepest: float
    key: str
    configured: float
    phase: str
    trainable: list[str]
    lr_range: Optional[list[float]] = None
    stopped_early: bool = False
    extra: dict = field(default_factory=dict)

    def suggestion(self, which: Suggestion = "valley") -> float:
        return self.valley if which == "valley" else self.steepest

    def override(self, which: Suggestion = "valley") -> dict[str, Any]:
        """The config that sets the suggested LR: a YAML mapping for ``lit-ft fit -c``.

        With ``lr_range`` both ends are scaled by the same factor, so the spread is kept.
        """
        lr = float(self.suggestion(which))
        if self.key == "model.lr_range" and self.lr_range is not None:
            factor = lr / self.configured
            return {"model": {"lr_range": [float(f"{v * factor:.3g}") for v in self.lr_range]}}
        return {"model": {"optimizer": {"init_args": {"lr": float(f"{lr:.3g}")}}}}

    def describe(self) -> str:
        """Two lines for the console: the suggestions and what the sweep covered."""
        n = len(self.lrs)
        end = f", stopped at step {n} (loss diverged)" if self.stopped_early else ""
        return (
            f"lit-ft lr_find: {self.key} (configured {self.configured:.3g}): "
            f"valley {self.valley:.3g}, steepest {self.steepest:.3g}\n"
            f"  phase {self.phase} (training {', '.join(self.trainable)}), {n} steps "
            f"from {self.lrs[0]:.3g} to {self.lrs[-1]:.3g}{end}; every param group kept its ratio to it"
        )

    def figure(self) -> Figure:
        """Loss against the reference LR (log x), raw and smoothed, both suggestions marked."""
        fig = Figure(figsize=(7, 4.2))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        ax.plot(self.lrs, self.losses, color="0.75", lw=1, label="loss")
        ax.plot(self.lrs, self.smoothed, color="C0", lw=2, label="smoothed")
        for lr, name, color in ((self.valley, "valley", "C2"), (self.steepest, "steepest", "C3")):
            i = int(np.argmin(np.abs(np.log(self.lrs) - math.log(lr))))
            ax.plot([lr], [self.smoothed[i]], "o", color=color, ms=8, label=f"{name} {lr:.2g}")
        ax.axvline(self.configured, color="0.4", ls=":", lw=1, label=f"configured {self.configured:.2g}")
        ax.set_xscale("log")
        ax.set_xlabel(self.key)
        ax.set_ylabel("training loss")
        finite = [v for v in (*self.losses, *self.smoothed) if math.isfinite(v)]
        if finite:  # from the lowest loss to a little above the start: divergence would squash the rest
            low, start = min(finite), max(self.smoothed[0], self.losses[0])
            span = max(start - low, 1e-3)
            ax.set_ylim(low - 0.05 * span, start + 0.3 * span)
        ax.set_title(f"LR finder, phase {self.phase}: every group x one factor")
        ax.legend(loc="best", fontsize=8)
        fig.tight_layout()
        return fig


# ---------------------------------------------------------------------------- the sweep
def lr_find(
    model: "ImageClassifier",
    datamodule: Any,
    *,
    min_lr: float = MIN_LR,
    max_lr: float = MAX_LR,
    num_steps: int = NUM_STEPS,
    phase: Optional[Phase] = None,
    window: int = 5,
    diverge: Optional[float] = DIVERGE,
    accumulate_grad_batches: int = 1,
    gradient_clip_val: Optional[float] = None,
    gradient_clip_algorithm: str = "norm",
    device: Optional[torch.device] = None,
) -> LRFindResult:
    """Sweep the reference LR from ``min_lr`` to ``max_lr`` with every param group at its ratio.

    Args:
        model: the classifier (its optimizer, LR options and freeze plan are used as configured).
        datamodule: its data; the training batches come from ``datamodule.train_dataloader()``
            (``setup("fit")`` is called here).
        min_lr: first reference LR.
        max_lr: last reference LR.
        num_steps: optimizer steps (exponentially spaced LRs).
        phase: ``None``: the groups that train at step 0 of the freeze plan; ``"head"``: the head
            only; ``"all"``: every group the plan ever trains (what LR after unfreezing).
        window: points of the centred smoothing windows (:func:`smooth_losses`).
        diverge: stop once the (causally) smoothed loss exceeds this many times its best (None: never).
        accumulate_grad_batches: batches per optimizer step (as the run's trainer).
        gradient_clip_val: clip gradients as the run's trainer would.
        gradient_clip_algorithm: ``norm`` or ``value``.
        device: where to run (default: where the model is).

    Returns:
        :class:`LRFindResult`; the model, RNGs and data are as they were before the call.

    Raises:
        UserError: a bad range, or a loss that diverged too early to suggest anything.
    """
    if not (0 < min_lr < max_lr) or num_steps < 2:
        raise UserError(
            f"lr_find needs 0 < min_lr < max_lr and num_steps >= 2, got {min_lr}, {max_lr}, {num_steps}",
            f"e.g. --min_lr {MIN_LR} --max_lr {MAX_LR} --num_steps {NUM_STEPS}",
        )
    saved = _Snapshot(model)
    start_device = saved.device
    device = torch.device(device) if device is not None else start_device
    try:
        if device != start_device:
            model.to(device)
        trainable = _phase_groups(model, phase)
        optimizer, key, configured, lr_range = _optimizer(model)
        base_lrs = [g["lr"] for g in optimizer.param_groups]
        factors = [(min_lr / configured) * (max_lr / min_lr) ** (k / (num_steps - 1)) for k in range(num_steps)]
        model.train()
        PlanRunner(model.model, model.groups, model.freeze).apply(frozenset(trainable))
        params = [p for g in optimizer.param_groups for p in g["params"]]
        batches = _batches(datamodule, model, device)
        lrs, losses, group_lrs, stopped = [], [], [], False
        best = math.inf
        for k, m in enumerate(factors):
            for g, base in zip(optimizer.param_groups, base_lrs):
                g["lr"] = base * m
            optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for _ in range(accumulate_grad_batches):
                batch_idx, batch = next(batches)
                loss = model.step_loss(batch, batch_idx).loss / accumulate_grad_batches
                loss.backward()
                total += float(loss.detach())
            if gradient_clip_val:
                trained = [p for p in params if p.grad is not None]
                if gradient_clip_algorithm == "value":
                    torch.nn.utils.clip_grad_value_(trained, gradient_clip_val)
                else:
                    torch.nn.utils.clip_grad_norm_(trained, gradient_clip_val)
            optimizer.step()
            lrs.append(configured * m)
            losses.append(total)
            group_lrs.append([g["lr"] for g in optimizer.param_groups])
            smoothed_now = ema(losses)[-1]  # Lightning's stop rule: causal, beta 0.98
            if not math.isfinite(total) or (diverge is not None and k > 0 and smoothed_now > diverge * best):
                stopped = k < num_steps - 1
                break
            best = min(best, smoothed_now)
        # Which groups really trained (received gradients), for the report.
        grads = {n: p.grad is not None for n, p in model.model.named_parameters()}
        names = [g.name for g in model.groups if any(grads[n] for n in g.param_names)]
    finally:
        saved.restore(model)
    # The last point is where the loss blew up (or the end): drop non-finite points from the curve.
    keep = [i for i, v in enumerate(losses) if math.isfinite(v)]
    lrs, losses, group_lrs = [lrs[i] for i in keep], [losses[i] for i in keep], [group_lrs[i] for i in keep]
    if len(losses) < 3:
        raise UserError(
            f"the loss diverged after {len(losses)} of {num_steps} lr_find steps (from {min_lr:g})",
            "lower --min_lr, or check the data and the loss",
        )
    smoothed = smooth_losses(losses, window)
    return LRFindResult(
        lrs=lrs, losses=losses, smoothed=smoothed,
        group_names=[g.get("name", str(i)) for i, g in enumerate(optimizer.param_groups)], group_lrs=group_lrs,
        valley=lrs[valley(smoothed)], steepest=lrs[steepest(lrs, smoothed)],
        key=key, configured=configured, lr_range=lr_range, phase=phase or "start", trainable=names, stopped_early=stopped,
    )


def _phase_groups(model: "ImageClassifier", phase: Optional[Phase]) -> frozenset[int]:
    """Layer groups that train in ``phase`` of the model's freeze plan."""
    plan = TrainingPlan(model.freeze)
    if phase is None:
        return plan.trainable(0, 0)
    if phase == "head":
        return frozenset({plan.num_groups - 1})
    if phase == "all":
        return plan.ever_trainable
    raise UserError(f"unknown lr_find phase {phase!r}", "use head, all, or leave it unset (the phase at step 0)")


def _optimizer(model: "ImageClassifier") -> tuple[torch.optim.Optimizer, str, float, Optional[list[float]]]:
    """The run's optimizer (every group, scaled) and the reference LR: (optimizer, key, value, lr_range)."""
    hp = model.hparams
    optimizer = O.build_optimizer(
        model.optimizer_factory, model.model, model.groups, hp.lr_mult, hp.layer_decay, hp.lr_range, hp.no_decay_norm_bias
    )
    if hp.lr_range is not None:
        low, high = (float(v) for v in hp.lr_range)
        return optimizer, "model.lr_range", high, [low, high]
    return optimizer, "model.optimizer.init_args.lr", float(optimizer.defaults["lr"]), None


def _batches(datamodule: Any, model: "ImageClassifier", device: torch.device) -> Iterator[tuple[int, Any]]:
    """Training batches on ``device``, epoch after epoch, as the fit loop hands them to the model."""
    if hasattr(datamodule, "set_data_config") and getattr(model, "data_config", None) is not None:
        datamodule.set_data_config(model.data_config)  # what fit's trainer would hand it
    datamodule.prepare_data()
    datamodule.setup("fit")
    epoch, index = 0, 0
    while True:
        loader = datamodule.train_dataloader()
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        empty = True
        for batch in loader:
            empty = False
            batch = datamodule.on_before_batch_transfer(batch, 0)
            batch = datamodule.transfer_batch_to_device(batch, device, 0)
            yield index, datamodule.on_after_batch_transfer(batch, 0)
            index += 1
        if empty:
            raise UserError("lr_find: the training loader is empty", "give the data some training images")
        epoch += 1


class _Snapshot:
    """Everything the sweep changes, to put back exactly: weights and buffers, gradients,
    ``requires_grad``, module modes, the device, and the Python/NumPy/torch RNG states."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        params = list(model.parameters())
        self.requires_grad = [p.requires_grad for p in params]
        self.grads = [None if p.grad is None else p.grad.detach().clone() for p in params]
        self.modes = [m.training for m in model.modules()]
        self.device = params[0].device if params else torch.device("cpu")
        self.rng = (random.getstate(), np.random.get_state(), torch.get_rng_state())
        self.cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None

    def restore(self, model: torch.nn.Module) -> None:
        model.to(self.device)
        model.load_state_dict(self.state)
        for p, flag, grad in zip(model.parameters(), self.requires_grad, self.grads):
            p.requires_grad_(flag)
            p.grad = grad
        for m, mode in zip(model.modules(), self.modes):
            m.training = mode
        random.setstate(self.rng[0])
        np.random.set_state(self.rng[1])
        torch.set_rng_state(self.rng[2])
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)


# ---------------------------------------------------------------------------- the command
def lr_find_command(
    cli: "LitFTCLI",
    phase: Optional[Phase] = None,
    min_lr: float = MIN_LR,
    max_lr: float = MAX_LR,
    num_steps: int = NUM_STEPS,
    suggestion: Suggestion = "valley",
    apply: bool = False,
) -> None:
    """Find a learning rate: sweep one factor on every param group's LR (ratios kept), suggest two.

    Prints fastai's ``valley`` and the steepest-descent suggestion, saves the curve with both
    marked as ``lr_find.png`` in the run directory and logs it to TensorBoard. The model, data
    and RNGs are left as they were.

    Args:
        phase: which groups train during the sweep: unset = the freeze plan's groups at step 0;
            ``head`` = the head only; ``all`` = every group the plan ever trains (the LR after
            unfreezing).
        min_lr: first value of the reference LR (``optimizer.init_args.lr``, or the head's LR
            with ``lr_range``).
        max_lr: last value of the reference LR.
        num_steps: optimizer steps of the sweep (exponentially spaced LRs).
        suggestion: which suggestion ``--apply`` writes: ``valley`` or ``steepest``.
        apply: write the suggestion as a YAML override (``<run dir>/<experiment>_lr.yaml``) to
            add as a last ``--config`` of ``lit-ft fit``.
    """
    trainer = cli.trainer
    result = lr_find(
        cli.model, cli.datamodule, min_lr=min_lr, max_lr=max_lr, num_steps=num_steps, phase=phase,
        accumulate_grad_batches=int(trainer.accumulate_grad_batches),
        gradient_clip_val=trainer.gradient_clip_val, gradient_clip_algorithm=str(trainer.gradient_clip_algorithm or "norm"),
        device=trainer.strategy.root_device,
    )
    print(result.describe(), flush=True)
    run_dir = Path(trainer.log_dir or ".")
    run_dir.mkdir(parents=True, exist_ok=True)
    fig = result.figure()
    png = run_dir / "lr_find.png"
    fig.savefig(png, dpi=120)
    _log_to_tensorboard(trainer, result, fig)
    print(f"lit-ft lr_find: curve saved to {png}", flush=True)
    if apply:
        configs = [str(c) for c in (cli.config.get("config") or [])]
        stem = Path(configs[-1]).stem if configs else "experiment"
        out = run_dir / f"{stem}_lr.yaml"
        text = f"# lit-ft lr_find ({suggestion} suggestion, phase {result.phase}); add as the last --config of lit-ft fit\n"
        out.write_text(text + yaml.safe_dump(result.override(suggestion), sort_keys=False))
        given = " ".join(f"-c {c}" for c in configs) or "-c <your config>"
        print(f"lit-ft lr_find: wrote {out}\n  use: lit-ft fit {given} -c {out}", flush=True)


def _log_to_tensorboard(trainer: Any, result: LRFindResult, fig: Figure) -> None:
    from lit_ft.callbacks.figures import figure_to_array, summary_writer

    writer = summary_writer(trainer)
    if writer is None:
        return
    writer.add_image("lr_find/curve", figure_to_array(fig), 0, dataformats="HWC")
    for k, (lr, loss, smooth) in enumerate(zip(result.lrs, result.losses, result.smoothed)):
        writer.add_scalar("lr_find/lr", lr, k)
        writer.add_scalar("lr_find/loss", loss, k)
        writer.add_scalar("lr_find/smoothed_loss", smooth, k)
    writer.add_text("lr_find/suggestions", "    " + result.describe().replace("\n", "\n    "), 0)
    writer.flush()

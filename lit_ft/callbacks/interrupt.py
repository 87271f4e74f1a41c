"""SIGTERM / Ctrl-C during fit: save a resumable ``last.ckpt`` at a batch boundary, then exit.

What Lightning 2.6 does by itself: its SIGTERM handler only sets ``trainer.received_sigterm``;
the loops then raise ``SIGTERMException`` (a ``SystemExit`` with no code, so the process exits
with status 0) at the end of the current batch, and nothing is saved. Ctrl-C raises
``KeyboardInterrupt`` wherever Python happens to be (possibly half-way through an optimizer
step); Lightning catches it and calls ``sys.exit(1)``, again without a checkpoint.

:class:`GracefulInterrupt` turns both into "finish this batch, save, exit non-zero":

* single process: at ``on_train_batch_end`` (the point where Lightning's own step-based
  checkpoints are taken, so the loop counters restore exactly) it saves ``last.ckpt``; it stops
  only after Lightning has written that step's logged values to the loggers (which happens right
  after that hook: stopping inside it lost the step's scalars, as the resumed run skips the
  step), at the next of: Lightning's own SIGTERM stop after the batch, the next batch start,
  the validation start or the epoch end. The exit status is 128 + signal: 143 for SIGTERM,
  130 for SIGINT (:class:`TrainingInterrupted`);
* several processes (DDP, torchrun, SLURM): SIGTERM only sets a flag, and at every training batch
  end the ranks agree with one all-reduce ("did any rank get SIGTERM?"); then every rank saves
  (rank 0 writes) and all stop at the same point. So a SIGTERM that reaches one node only (one
  torchrun launcher, one SLURM task) stops the whole run with a resumable checkpoint;
* a signal that lands outside a training batch (validation, before this callback's handler is
  installed) is saved from ``on_exception`` instead;
* a second Ctrl-C stops at once, without saving; under DDP Ctrl-C is left to Lightning (ranks
  would see it at different batches), SIGTERM is handled;
* SIGTERM before the first training step of the process (setup, sanity check) exits 143 without
  saving: the checkpoint the run started from is still the latest. Ctrl-C during validation
  takes effect after the next training batch.

Resuming (``--ckpt_path last``) continues inside the epoch: the train loader skips the batches
already trained on (:class:`lit_ft.data.resumable.ResumableDataLoader`), and TensorBoard gets
every training step's scalars exactly once over the two runs. One loss remains, Lightning 2.6's:
a stop in an epoch's last batch or during its validation resumes past that validation (its
restart fast-forwards a validation that had not finished), so that epoch's ``val/*`` scalars
and its checkpoint-by-metric decision are missing; the weights are still exact.

Why not Lightning's own SIGTERM handling under DDP: in 2.6 its handler runs a
``dist.broadcast`` *inside the signal handler* (``trainer/connectors/signal_connector.py``,
``_sigterm_notifier_fn``), and only rank 0's flag is ever acted upon (the per-batch broadcast
from rank 0). A SIGTERM that reaches a rank other than 0 (torchrun forwards it from that node's
launcher only) makes that rank enter a collective the others never enter: the ranks' collectives
go out of step and hang. Seen with 2 torchrun "nodes" on gloo: the signalled worker ignored
SIGTERM until torchrun SIGKILLed it 30 s later, rank 0 then died with "Connection closed by
peer", and nothing was saved since the last epoch end.
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any, Optional

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lit_ft.callbacks.checkpointing import save_last_checkpoint


class TrainingInterrupted(SystemExit):
    """Fit stopped by a signal after saving a resumable checkpoint; ``code`` is 128 + signal number.

    Attributes:
        message: what happened and how to resume, for the user.
    """

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(128 + signum)
        self.message = message


class GracefulInterrupt(Callback):
    """Save a resumable checkpoint and exit non-zero on SIGTERM or Ctrl-C during ``fit``.

    Args:
        enabled: handle the signals (False: Lightning's default behaviour).
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.requested: Optional[int] = None  # the signal number once a stop was asked for
        self.saved_to: Optional[str] = None
        self._pending: Optional[tuple[int, str]] = None  # (signal, message): saved, stop at the next stop point
        self._previous_sigint: Any = None
        self._previous_sigterm: Any = None
        self._steps_here = 0  # training batches finished by this process (not restored ones)

    # ------------------------------------------------------------------ signal handling
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.requested, self.saved_to, self._pending, self._steps_here = None, None, None, 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Installed here, after Lightning registered its SIGTERM handler: Lightning's teardown then
        # puts back the handlers it found, removing ours on every exit path (exceptions included).
        # Under DDP every rank gets Ctrl-C at a slightly different batch: a per-rank decision to save
        # would deadlock in the save's barrier, so Lightning's own Ctrl-C handling stays in place there.
        if not (self.enabled and _main_thread()):
            return
        if trainer.world_size == 1:
            self._previous_sigint = signal.signal(signal.SIGINT, self._on_sigint)
        else:  # replaces Lightning's handler, which runs a collective inside the handler (module docstring)
            self._previous_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore_handlers()

    def _restore_handlers(self) -> None:
        if _main_thread():
            if self._previous_sigint is not None:
                signal.signal(signal.SIGINT, self._previous_sigint)
            # Only if ours is still there: Lightning's teardown may already have put back the
            # handler it found before fit, which must not be replaced by its own again.
            if self._previous_sigterm is not None and signal.getsignal(signal.SIGTERM) == self._on_sigterm:
                signal.signal(signal.SIGTERM, self._previous_sigterm)
        self._previous_sigint = self._previous_sigterm = None

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        # No collective and no I/O here: the ranks agree at the next batch end (on_train_batch_end).
        self.requested = signum

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self.requested is not None:  # second Ctrl-C: stop now
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.requested = signum
        print("\nlit-ft: Ctrl-C: saving a checkpoint after this batch (press again to stop at once)", file=sys.stderr)

    def _signal(self, trainer: L.Trainer) -> Optional[int]:
        if self.requested is not None:
            return self.requested
        return int(signal.SIGTERM) if trainer.received_sigterm else None

    # ------------------------------------------------------------------ saving
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._steps_here += 1
        if not self.enabled or self._pending is not None:
            return
        signum = self._signal(trainer)
        if trainer.world_size > 1:
            # Every rank reaches this point once per batch (DDP's samplers give each rank the same
            # number of batches): one tiny all-reduce, so all ranks save and stop at the same batch.
            signum = int(signal.SIGTERM) if trainer.strategy.reduce_boolean_decision(signum is not None, all=False) else None
        if signum is None:
            return
        self._save(trainer)  # every rank calls it; rank 0 writes
        self._pending = (signum, self._message(trainer, signum))

    # Where a saved run stops: after this step's values reached the loggers, before anything else
    # is trained, validated or logged. (A SIGTERM mid-epoch is stopped by Lightning first, after
    # the batch: see on_exception.)
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._stop_if_pending(trainer)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop_if_pending(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop_if_pending(trainer)

    def _stop_if_pending(self, trainer: L.Trainer) -> None:
        if self._pending is None:
            return
        (signum, message), self._pending = self._pending, None
        if trainer.is_global_zero:
            print(f"lit-ft: {message}", file=sys.stderr, flush=True)
        raise TrainingInterrupted(message, signum)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_handlers()
        if not self.enabled or not isinstance(exception, SIGTERMException):
            return
        exception.code = 128 + int(signal.SIGTERM)  # Lightning's SIGTERMException would exit with 0
        if self._pending is not None:  # saved at the end of the batch Lightning stopped after
            (_, message), self._pending = self._pending, None
            if trainer.is_global_zero:
                print(f"lit-ft: {message}", file=sys.stderr, flush=True)
            return
        if self.saved_to is not None:
            return
        if trainer.state.fn == TrainerFn.FITTING and self._steps_here > 0 and not trainer.sanity_checking:
            self._save(trainer)
            message = self._message(trainer, int(signal.SIGTERM))
        else:  # nothing trained in this process: the checkpoint it started from is still the latest
            message = "interrupted by SIGTERM before any training step of this run; nothing new to save"
        if trainer.is_global_zero:
            print(f"lit-ft: {message}", file=sys.stderr, flush=True)

    def _save(self, trainer: L.Trainer) -> None:
        self.saved_to = str(save_last_checkpoint(trainer))

    def _message(self, trainer: L.Trainer, signum: int) -> str:
        name = signal.Signals(signum).name
        return (
            f"interrupted by {name} at global step {trainer.global_step} (epoch {trainer.current_epoch}); "
            f"saved a resumable checkpoint to {self.saved_to}\n"
            "HINT: resume with the same command plus --ckpt_path last (or --ckpt_path <that file>)"
        )


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()

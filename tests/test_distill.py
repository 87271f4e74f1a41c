"""Knowledge distillation (model.distill): the loss, the frozen teacher, consistent teaching, the CLI."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from lit_ft import UserError
from lit_ft.cli import main
from lit_ft.distill import Distillation, adapt, distillation_loss, kd_loss, load_teacher
from lit_ft.regularizers import Mixup
from lit_ft.schedules import FreezeUnfreeze
from tests.helpers import snapshot, tiny_data, tiny_model, trainer
from tests.test_cli import TINY

pytestmark = pytest.mark.usefixtures("one_thread")
CLASSES = [f"class_{i}" for i in range(4)]  # SyntheticDataModule's names


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory) -> Path:
    """A lit-ft checkpoint of another backbone, fine-tuned on the synthetic 4-class task."""
    root = tmp_path_factory.mktemp("teacher")
    L.seed_everything(1)
    model = tiny_model("test_efficientnet", class_names=CLASSES)  # as the CLI names them (from the data)
    t = trainer(root, max_epochs=2)
    t.fit(model, tiny_data())
    path = root / "teacher.ckpt"
    t.save_checkpoint(path, weights_only=True)
    return path


# ---------------------------------------------------------------------------------------- the loss


def test_kd_gradient_matches_the_hand_computation():
    torch.manual_seed(0)
    s = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 5, dtype=torch.float64)
    y = torch.tensor([0, 3, 4])
    alpha, T = 0.7, 2.5
    task = F.cross_entropy(s, y)
    loss, kd = distillation_loss(task, s, t, alpha, T)
    loss.backward()
    p_s, p_t = (s.detach() / T).softmax(-1), (t / T).softmax(-1)
    # d/ds of CE = (softmax(s) - onehot) / B; of T^2 * KL(p_t || p_s) = T * (p_s - p_t) / B
    hand = (1 - alpha) * (s.detach().softmax(-1) - F.one_hot(y, 5)) / 3 + alpha * T * (p_s - p_t) / 3
    assert torch.allclose(s.grad, hand, atol=1e-6)
    kl = (p_t * (p_t.log() - p_s.log())).sum(-1).mean() * T * T
    assert torch.allclose(kd.double(), kl, atol=1e-6)
    assert kd_loss(t, t, T).abs() < 1e-6  # a student that agrees with its teacher pays nothing


def test_a_teacher_of_another_size_and_normalisation_gets_the_batch_resized_and_renormalised():
    student = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "input_size": (3, 32, 32)}
    teacher = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "input_size": (3, 48, 48), "interpolation": "bicubic"}
    pixels = torch.full((2, 3, 32, 32), 0.8)
    x = (pixels - 0.5) / 0.5
    out = adapt(x, student, teacher)
    assert out.shape == (2, 3, 48, 48)
    expected = (0.8 - torch.tensor(teacher["mean"])) / torch.tensor(teacher["std"])
    assert torch.allclose(out[0, :, 10, 10], expected, atol=1e-5)
    assert adapt(x, student, None) is x and adapt(x, student, student) is x  # same preprocessing: untouched


def test_bad_options_are_user_errors():
    with pytest.raises(UserError, match="alpha"):
        Distillation("t.ckpt", alpha=1.5)
    with pytest.raises(UserError, match="temperature"):
        Distillation("t.ckpt", temperature=0.0)
    with pytest.raises(UserError, match="not found"):
        load_teacher("missing.ckpt", 4)


# ---------------------------------------------------------------------------------------- training


def _fit(tmp_path, distill=None, epochs=2, seed=0, **kw):
    L.seed_everything(seed)
    model = tiny_model(distill=distill, **kw)
    t = trainer(tmp_path, max_epochs=epochs)
    t.fit(model, tiny_data())
    return model, t


def test_alpha_zero_is_a_plain_fit_bit_for_bit(tmp_path, teacher_ckpt):
    plain, _ = _fit(tmp_path / "a")
    kd, t = _fit(tmp_path / "b", Distillation(str(teacher_ckpt), alpha=0.0, temperature=3.0))
    a, b = snapshot(plain), snapshot(kd)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert "train/kd_loss" in t.callback_metrics  # the teacher did run


def test_the_teacher_is_frozen_untouched_and_not_in_the_students_checkpoint(tmp_path, teacher_ckpt):
    reference = load_teacher(str(teacher_ckpt), 4).net.state_dict()
    distill = Distillation(str(teacher_ckpt), alpha=0.5)
    L.seed_everything(0)
    model = tiny_model(distill=distill, freeze=FreezeUnfreeze(epochs=1), mixup=Mixup(mixup_alpha=0.4, cutmix_alpha=1.0))
    t = trainer(tmp_path, max_epochs=2)
    t.fit(model, tiny_data())
    teacher = distill.teacher
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    after = teacher.state_dict()
    for k, v in reference.items():  # weights and BatchNorm statistics alike
        assert torch.equal(after[k], v), k
    in_optimizer = {id(p) for g in t.optimizers[0].param_groups for p in g["params"]}
    assert not in_optimizer & {id(p) for p in teacher.parameters()}
    assert not any(m is teacher for m in model.modules())
    path = tmp_path / "student.ckpt"
    t.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)["state_dict"]
    assert saved.keys() == model.state_dict().keys()
    assert not any("distill" in k or "teacher" in k for k in saved)
    assert {"train/kd_loss", "train/task_loss", "train/teacher_agreement"} <= set(t.callback_metrics)


class FirstInput(L.Callback):
    """Record what the first convolution of the student and of the teacher see, per training step."""

    def __init__(self, distill: Distillation) -> None:
        self.distill, self.student, self.teacher, self.handles = distill, [], [], []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if not self.handles:  # the teacher exists from the first step on
            self.handles.append(self.distill.teacher.conv_stem.register_forward_pre_hook(lambda m, a: self.teacher.append(a[0].clone())))

    def on_train_start(self, trainer, module) -> None:
        module.model.conv1[0].register_forward_pre_hook(lambda m, a: self.student.append(a[0].clone()))


def test_the_teacher_sees_the_students_augmented_and_mixed_batch(tmp_path, teacher_ckpt):
    distill = Distillation(str(teacher_ckpt), alpha=0.5)
    spy = FirstInput(distill)
    L.seed_everything(0)
    model = tiny_model(distill=distill, mixup=Mixup(mixup_alpha=1.0))
    data = tiny_data(augment=True)
    trainer(tmp_path, max_epochs=1, callbacks=[spy], limit_val_batches=0).fit(model, data)
    # From step 1 on both are recorded (the teacher's hook went in after step 0).
    student, teacher = spy.student[-len(spy.teacher):], spy.teacher
    assert len(teacher) >= 2
    # The two backbones normalise differently (test_resnet 0.5/0.5, test_efficientnet ImageNet's
    # mean/std): the teacher gets the same pixels, re-normalised to its own statistics.
    s_cfg, t_cfg = data.resolved_data_config, distill.load(model.class_names).data_config
    assert tuple(s_cfg["mean"]) != tuple(t_cfg["mean"])
    pixels = lambda x, cfg: x * torch.tensor(cfg["std"]).view(1, 3, 1, 1) + torch.tensor(cfg["mean"]).view(1, 3, 1, 1)  # noqa: E731
    for s, t in zip(student, teacher):
        assert torch.allclose(pixels(s, s_cfg), pixels(t, t_cfg), atol=1e-5)
    raw = next(iter(data.train_dataloader()))[0]
    assert not any(torch.equal(raw, s) for s in student)  # what they saw was mixed, not the loader's batch


def test_resumed_distillation_equals_an_uninterrupted_run(tmp_path, teacher_ckpt):
    full, _ = _fit(tmp_path / "full", Distillation(str(teacher_ckpt), alpha=0.6), epochs=2)
    _, first = _fit(tmp_path / "first", Distillation(str(teacher_ckpt), alpha=0.6), epochs=1)
    mid = tmp_path / "mid.ckpt"
    first.save_checkpoint(mid)
    L.seed_everything(0)
    resumed = tiny_model(distill=Distillation(str(teacher_ckpt), alpha=0.6))
    trainer(tmp_path / "resumed", max_epochs=2).fit(resumed, tiny_data(), ckpt_path=str(mid), weights_only=True)
    a, b = snapshot(full), snapshot(resumed)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_pure_distillation_pulls_the_student_towards_the_teacher(tmp_path, teacher_ckpt):
    teacher = load_teacher(str(teacher_ckpt), 4).net.eval()
    plain, _ = _fit(tmp_path / "a", epochs=3)
    kd, _ = _fit(tmp_path / "b", Distillation(str(teacher_ckpt), alpha=1.0, temperature=1.0), epochs=3)
    dm = tiny_data()
    dm.setup("fit")
    x = torch.cat([b[0] for b in dm.val_dataloader()])
    with torch.no_grad():
        t = teacher(x)
        gap = {name: kd_loss(m.eval()(x), t, 1.0).item() for name, m in (("plain", plain), ("kd", kd))}
    assert gap["kd"] < 0.7 * gap["plain"], gap


# ---------------------------------------------------------------------------------------- teachers


def test_a_teacher_from_an_exported_timm_folder_or_a_weights_file(tmp_path, teacher_ckpt):
    from timm.models import save_for_hf

    ckpt = load_teacher(str(teacher_ckpt), 4)
    folder = tmp_path / "export"
    save_for_hf(ckpt.net, str(folder), model_config={"label_names": ckpt.class_names}, safe_serialization=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = ckpt.net.eval()(x)
        exported = load_teacher(str(folder), 4)
        assert exported.class_names == ckpt.class_names
        assert torch.equal(exported.net.eval()(x), expected)
        bare = load_teacher(str(folder / "model.safetensors"), 4, backbone="test_efficientnet")
        assert bare.class_names is None and bare.data_config is None  # a bare file: the student's preprocessing
        assert torch.equal(bare.net.eval()(x), expected)
    with pytest.raises(UserError, match="does not predict the student's 3 classes"):
        load_teacher(str(folder / "model.safetensors"), 3, backbone="test_efficientnet")
    torch.save(ckpt.net.state_dict(), tmp_path / "w.pth")
    with pytest.raises(UserError, match="set model.distill.backbone"):
        load_teacher(str(tmp_path / "w.pth"), 4)


# ---------------------------------------------------------------------------------------- the CLI


def test_distillation_from_the_cli_logs_its_terms(teacher_ckpt):
    cli = main(["fit", *TINY, "--trainer.max_epochs", "1", "--model.distill.teacher", str(teacher_ckpt),
                "--model.distill.alpha", "0.5", "--model.distill.temperature", "2"], return_cli=True)
    metrics = cli.trainer.callback_metrics
    assert {"train/kd_loss", "train/task_loss", "train/teacher_agreement"} <= set(metrics)
    assert 0.0 <= float(metrics["train/teacher_agreement"]) <= 1.0
    saved = torch.load(Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["hyper_parameters"]["distill"]["init_args"]["teacher"] == str(teacher_ckpt)  # the run says what taught it
    assert not any("teacher" in k for k in saved["state_dict"])


def test_a_teacher_of_other_classes_is_one_clear_error(tmp_path, capsys):
    L.seed_everything(0)
    other = tiny_model("test_resnet", num_classes=3, class_names=CLASSES[:3])
    t = trainer(tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=0)
    t.fit(other, tiny_data(num_classes=3))
    path = tmp_path / "three.ckpt"
    t.save_checkpoint(path, weights_only=True)
    with pytest.raises(SystemExit) as exit:
        main(["fit", *TINY, "--trainer.max_epochs", "1", "--model.distill.teacher", str(path)])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert "predicts 3 classes (class_0, class_1, class_2) but the student's data has 4 classes" in err
    assert "HINT: distil from a teacher fine-tuned on the same classes" in err


def test_class_names_must_match_in_order_where_both_sides_have_them(teacher_ckpt):
    from lit_ft.distill import check_classes

    teacher = load_teacher(str(teacher_ckpt), 4)
    check_classes(teacher, CLASSES)
    check_classes(teacher, ["0", "1", "2", "3"])  # a student built without names: the count decides
    with pytest.raises(UserError, match="in the same order"):
        check_classes(teacher, [CLASSES[1], CLASSES[0], *CLASSES[2:]])
    with pytest.raises(UserError, match="predicts 4 classes"):
        check_classes(teacher, ["0", "1", "2"])

"""Each regularizer changes what it claims to change, against the same run without it."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lit_ft.cli import main
from tests.cli_args import synthetic_run
from lit_ft.errors import UserError
from lit_ft.regularizers import BSS, DELTA, L1, L2, L2SP, Mixup, Regularizer, StepOutputs
from lit_ft.regularizers.bss import smallest_singular_values
from lit_ft.regularizers.delta import channel_view
from lit_ft.schedules import FreezeUnfreeze
from tests.helpers import snapshot, tiny_data, tiny_model, trainer

# A random head (timm's, not the default zero one): these tests compare how far a few SGD steps
# move the backbone away from its start, so the task must pull on it from the first step.
SGD = dict(optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9), head_init="timm")


def _fit(tmp_path, epochs=2, data=None, **model_kw):
    L.seed_everything(0)
    model = tiny_model(**{**SGD, **model_kw})
    t = trainer(tmp_path, max_epochs=epochs)
    t.fit(model, data or tiny_data())
    return model, t


def _backbone_distance(model, before) -> float:
    """||w - w0|| over the backbone (every group but the head)."""
    names = [n for g in model.groups[:-1] for n in g.param_names]
    params = dict(model.model.named_parameters())
    return sum(((params[n].detach() - before["model." + n]) ** 2).sum() for n in names).sqrt().item()


@pytest.fixture(scope="module")
def vanilla(tmp_path_factory):
    """The run every regularizer is compared against (same seed, data, optimizer)."""
    L.seed_everything(0)
    model = tiny_model(**SGD)
    before = snapshot(model)
    trainer(tmp_path_factory.mktemp("vanilla"), max_epochs=2).fit(model, tiny_data())
    return model, before


# ---------------------------------------------------------------------------------------- L2-SP
def test_l2sp_keeps_the_backbone_closer_to_its_pretrained_weights(tmp_path, vanilla):
    base, before = vanilla
    model, t = _fit(tmp_path, regularizers=[L2SP(alpha=2.0, beta=0.0)])
    d_reg, d_base = _backbone_distance(model, before), _backbone_distance(base, before)
    assert d_reg < 0.6 * d_base, (d_reg, d_base)
    assert "reg/l2sp" in t.callback_metrics and "train/task_loss" in t.callback_metrics
    # The anchors are the starting weights, kept as buffers of the classifier (state_dict, .to()).
    reg = model.regularizers[0]
    assert torch.equal(reg.anchor("layer4.0.conv1.weight"), before["model.layer4.0.conv1.weight"])
    assert "regularizers.0.anchor__layer4__0__conv1__weight" in model.state_dict()
    assert not any(n.startswith("fc.") for n in reg._anchored)  # the head has no pretrained value


def test_l2sp_penalty_skips_frozen_params_and_anchoring_the_head_is_an_error():
    model = tiny_model(regularizers=[L2SP(alpha=1.0, beta=0.5)])
    reg = model.regularizers[0]
    with torch.no_grad():
        for p in model.model.parameters():
            p.add_(0.1)
    out = StepOutputs(x=None, y=None, feats=None, logits=None, loss=torch.zeros(()))
    head = model.model.get_classifier()
    expected_head = 0.25 * sum((p**2).sum() for p in head.parameters())
    n_body = sum(p.numel() for n, p in model.model.named_parameters() if not n.startswith("fc."))
    full = reg.penalty(model, out)
    assert torch.allclose(full, 0.5 * n_body * 0.01 + expected_head, rtol=1e-4)
    for n, p in model.model.named_parameters():
        p.requires_grad_(n.startswith("fc."))  # a linear probe: the backbone is frozen
    assert torch.allclose(reg.penalty(model, out), expected_head)
    with pytest.raises(UserError, match="head"):
        tiny_model(regularizers=[L2SP(groups=["layer4", "head"])])
    with pytest.raises(UserError, match="no layer group"):
        tiny_model(regularizers=[L2SP(groups=["nope"])])


def test_l2sp_anchor_after_resume_is_the_pretrained_weights_not_the_resumed_ones(tmp_path):
    torch.manual_seed(123)
    pretrained = tiny_model().model.state_dict()
    path = tmp_path / "pretrained.pth"
    torch.save(pretrained, path)
    tiny = [*synthetic_run(train_size=64), "--model.pretrained", str(path), "--model.regularizers",
            '[{"class_path": "lit_ft.regularizers.L2SP", "init_args": {"alpha": 0.1}}]']
    first = main(["fit", *tiny, "--trainer.max_epochs", "1"], return_cli=True)
    # The CLI rebuilds a resumed model with pretrained=false (random weights): the anchors must
    # come back from the checkpoint.
    cli = main(["fit", *tiny, "--trainer.max_epochs", "2", "--ckpt_path", "last"], return_cli=True)
    assert cli.trainer.current_epoch == 2 and Path(cli.trainer.log_dir) == Path(first.trainer.log_dir)
    reg = cli.model.regularizers[0]
    for name in ("conv1.0.weight", "layer3.0.conv2.weight", "bn1.weight"):
        assert torch.equal(reg.anchor(name), pretrained[name]), name
        assert not torch.equal(cli.model.model.state_dict()[name], pretrained[name])  # the weights did move


# ---------------------------------------------------------------------------------------- BSS
class SpectrumProbe(Regularizer):
    """Adds nothing; records the spectrum of each training batch's pooled features (B, D)."""

    name = "probe"

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[int, float, float]] = []  # (epoch, sum of 4 smallest, largest)

    def penalty(self, module, out):
        with torch.no_grad():
            f = module.model.forward_head(out.feats, pre_logits=True)
            s = torch.linalg.svdvals(f)
            self.seen.append((module.current_epoch, s.flip(0)[:4].sum().item(), s[0].item()))
        return out.loss.new_zeros(())

    def last_epoch(self):
        rows = [r for r in self.seen if r[0] == max(e for e, _, _ in self.seen)]
        return sum(r[1] for r in rows) / len(rows), sum(r[2] for r in rows) / len(rows)


def test_bss_lowers_the_smallest_singular_values_of_the_features(tmp_path):
    runs = {}
    for eta in (0.0, 5.0):
        probe = SpectrumProbe()
        regs = [BSS(eta=eta, k=4), probe] if eta else [probe]
        _, t = _fit(tmp_path / str(eta), regularizers=regs)
        runs[eta] = probe.last_epoch()
    (small_base, top_base), (small_bss, top_bss) = runs[0.0], runs[5.0]
    assert small_bss < 0.6 * small_base, runs  # the k smallest shrink...
    assert top_bss > 0.8 * top_base, runs  # ...not the whole spectrum
    assert t.callback_metrics["reg/bss"] >= 0
    assert smallest_singular_values(torch.diag(torch.tensor([3.0, 1.0, 2.0])), 2).tolist() == [1.0, 2.0]


def test_bss_costs_nothing_with_a_frozen_backbone():
    model = tiny_model(regularizers=[BSS()])
    feats = torch.randn(8, 96, 2, 2)  # no grad: as from a frozen backbone
    out = StepOutputs(x=None, y=None, feats=feats, logits=None, loss=torch.ones(()))
    assert model.regularizers[0].penalty(model, out) == 0


# ---------------------------------------------------------------------------------------- DELTA
def _feature_distance(model, reg, x) -> float:
    """Mean squared distance of the hooked feature maps to the teacher's, normalized the way DELTA
    compares them in training (BatchNorm on batch statistics, nothing updated)."""
    student = copy.deepcopy(model.model).train()
    for m in student.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = False
    store = {}
    with torch.no_grad(), reg._hooked(student, store, stop=False):
        student.forward_features(x)
        teacher = reg._teacher_maps(x, student)
    return sum(((channel_view(store[n]) - channel_view(teacher[n])) ** 2).mean().item() for n in reg.layers)


def test_delta_keeps_feature_maps_closer_to_the_pretrained_ones(tmp_path, vanilla):
    base, before = vanilla
    model, t = _fit(tmp_path, regularizers=[DELTA(alpha=0.3, layers=["layer2", "layer4"])])
    reg = model.regularizers[0]
    # The teacher is the starting network, untouched by training (weights and BN statistics).
    sd = reg.teacher.state_dict()
    assert all(torch.equal(sd[k], before["model." + k]) for k in sd if not k.startswith("fc."))
    assert not any(p.requires_grad for p in reg.teacher.parameters())
    data = tiny_data()
    data.setup("fit")
    x = next(iter(data.train_dataloader()))[0]
    L.seed_everything(0)
    assert _feature_distance(tiny_model(**SGD), reg, x) < 1e-10  # zero at the starting point
    d_reg, d_base = _feature_distance(model, reg, x), _feature_distance(base, reg, x)
    assert d_reg < 0.7 * d_base, (d_reg, d_base)
    assert t.callback_metrics["reg/delta"] > 0


def test_delta_attention_weights_are_estimated_once_and_checkpointed(tmp_path):
    model, _ = _fit(tmp_path, epochs=1, regularizers=[DELTA(alpha=0.1, layers=["layer3", "layer4"], attention=True, attention_batches=2)])
    reg = model.regularizers[0]
    assert int(reg.attention_seen) == 2
    for i, c in enumerate((192, 96)):
        w = getattr(reg, f"attention_{i}")
        assert w.shape == (c,) and torch.allclose(w.mean(), torch.tensor(1.0)) and w.std() > 0.01
    assert {"regularizers.0.attention_0", "regularizers.0.attention_seen"} <= set(model.state_dict())


def test_delta_does_not_run_the_teacher_while_the_backbone_is_frozen(tmp_path):
    calls = []
    model = tiny_model(**SGD, freeze=FreezeUnfreeze(epochs=1), regularizers=[DELTA(alpha=1.0, layers=["layer4"])])
    model.regularizers[0].teacher.conv1.register_forward_pre_hook(lambda *a: calls.append(model.current_epoch))
    seen = {}

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, module, *a):
            seen.setdefault(trainer.current_epoch, []).append(float(trainer.callback_metrics["reg/delta"]))

    trainer(tmp_path, max_epochs=2, callbacks=[Record()]).fit(model, tiny_data())
    assert set(calls) == {1} and all(v == 0 for v in seen[0])  # epoch 0: head only, no teacher pass
    assert any(v > 0 for v in seen[1])


def test_delta_unknown_layer_is_a_clear_error():
    with pytest.raises(UserError, match="not modules"):
        tiny_model(regularizers=[DELTA(layers=["layer9"])])


# ---------------------------------------------------------------------------------------- L1 / L2
def test_l1_and_l2_shrink_the_chosen_groups(tmp_path, vanilla):
    base, _ = vanilla
    model, t = _fit(tmp_path, regularizers=[L2(weight=2.0, groups=["layer4"]), L1(weight=0.1, groups=[-1])])
    l4 = lambda m: sum((p.detach() ** 2).sum() for n, p in m.model.named_parameters() if n.startswith("layer4.") and p.ndim > 1)  # noqa: E731
    assert l4(model) < 0.7 * l4(base)
    head = lambda m: m.model.fc.weight.detach().abs().sum()  # noqa: E731
    assert head(model) < 0.8 * head(base)
    assert {"reg/l2", "reg/l1"} <= set(t.callback_metrics)


# ---------------------------------------------------------------------------------------- mixup
def test_mixup_is_a_pure_function_of_its_position_and_leaves_inputs_alone():
    mix = Mixup(mixup_alpha=0.4, cutmix_alpha=1.0)
    x, y = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 0, 1])
    x0 = x.clone()
    np.random.seed(5)
    state = np.random.get_state()[1].copy()
    a = mix(x, y, 4, epoch=1, batch=3)
    b = mix(x, y, 4, epoch=1, batch=3)
    c = mix(x, y, 4, epoch=1, batch=4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[1], c[1])
    assert torch.equal(x, x0) and np.array_equal(np.random.get_state()[1], state)
    assert a[1].shape == (6, 4) and torch.allclose(a[1].sum(1), torch.ones(6))
    odd = mix(x[:5], y[:5], 4, epoch=0, batch=0)[1]
    assert torch.equal(odd[4], torch.nn.functional.one_hot(y[4], 4).float())  # the odd one out stays as is


def test_mixup_feeds_soft_targets_then_turns_off_and_accuracy_uses_hard_labels(tmp_path):
    model = tiny_model(**SGD, mixup=Mixup(mixup_alpha=1.0, off_epoch=1))
    seen: dict[int, list] = {}
    loss, acc_update = model.loss, model.train_acc.update

    def spy_loss(logits, targets):
        seen.setdefault(model.current_epoch, []).append(targets.detach().clone())
        return loss(logits, targets)

    hard_targets = []
    model.loss = spy_loss
    model.train_acc.update = lambda preds, target: (hard_targets.append(target.dtype), acc_update(preds, target))[1]
    t = trainer(tmp_path, max_epochs=2, log_every_n_steps=1)
    t.fit(model, tiny_data())
    soft = seen[0]
    assert all(s.ndim == 2 for s in soft)
    assert any(((s > 0) & (s < 1)).any() for s in soft)  # mixed, not one-hot
    assert all(s.ndim == 1 for s in seen[1])  # off from epoch 1
    assert set(hard_targets) == {torch.long}
    assert t.callback_metrics["reg/mixup"] == 0


# ---------------------------------------------------------------------------------------- model options
@pytest.mark.parametrize("option", ["drop_rate", "drop_path_rate"])
def test_dropout_options_make_the_training_forward_stochastic(option):
    x = torch.randn(4, 3, 32, 32)
    for rate, differs in ((0.0, False), (0.5, True)):
        torch.manual_seed(0)
        model = tiny_model("test_vit", head_init="normal", **{option: rate})  # a zero head hides any dropout
        model.train()
        a, b = model(x), model(x)
        assert (not torch.equal(a, b)) == differs, (option, rate)
        model.eval()
        assert torch.equal(model(x), model(x))


def test_label_smoothing_lowers_the_trained_models_confidence(tmp_path, vanilla):
    base, _ = vanilla
    model, _ = _fit(tmp_path, label_smoothing=0.4)
    data = tiny_data()
    data.setup("fit")
    x = next(iter(data.train_dataloader()))[0]
    conf = lambda m: m.eval()(x).softmax(-1).max(-1).values.mean()  # noqa: E731
    with torch.no_grad():
        assert conf(model) < conf(base) - 0.05


# ---------------------------------------------------------------------------------------- from YAML
TINY_YAML = {
    "trainer": {"accelerator": "cpu", "enable_progress_bar": False, "enable_model_summary": False, "log_every_n_steps": 1},
    "model": {"backbone": "test_resnet"},
    "data": {"class_path": "lit_ft.data.SyntheticDataModule",
             "init_args": {"image_size": 32, "batch_size": 16, "augment": False, "train_size": 64, "val_size": 32}},
}


def _events(run: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
    acc.Reload()
    return acc


def test_several_regularizers_with_a_freeze_schedule_from_one_config(tmp_path):
    cfg = {**TINY_YAML, "model": {
        "backbone": "test_resnet",
        "freeze": {"class_path": "lit_ft.schedules.FreezeUnfreeze", "init_args": {"epochs": 1}},
        "regularizers": [
            {"class_path": "lit_ft.regularizers.L2SP", "init_args": {"alpha": 0.01, "beta": 0.01}},
            {"class_path": "lit_ft.regularizers.DELTA", "init_args": {"alpha": 0.01, "layers": ["layer4"], "attention": True}},
            {"class_path": "lit_ft.regularizers.BSS", "init_args": {"eta": 0.001}},
        ],
        "mixup": {"mixup_alpha": 0.2, "cutmix_alpha": 1.0, "off_epoch": 2},
    }}
    cfg["trainer"] = {**cfg["trainer"], "callbacks": [{"class_path": "lit_ft.callbacks.EMA", "init_args": {"decay": 0.9}}]}
    path = tmp_path / "regs.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cli = main(["fit", "--config", str(path), "--trainer.max_epochs", "3"], return_cli=True)
    acc = _events(Path(cli.trainer.log_dir))
    tags = set(acc.Tags()["scalars"])
    assert {"reg/l2sp", "reg/delta", "reg/bss", "reg/mixup", "ema/decay", "train/task_loss"} <= tags, tags
    spe = 4  # 64 images / batch 16
    delta = {e.step: e.value for e in acc.Scalars("reg/delta")}
    assert all(v == 0 for s, v in delta.items() if s < spe) and any(v > 0 for s, v in delta.items() if s >= spe)
    mixing = {e.step: e.value for e in acc.Scalars("reg/mixup")}
    assert all(v == 1 for s, v in mixing.items() if s < 2 * spe) and all(v == 0 for s, v in mixing.items() if s >= 2 * spe)
    saved = yaml.safe_load((Path(cli.trainer.log_dir) / "config.yaml").read_text())
    assert [r["class_path"] for r in saved["model"]["regularizers"]][0] == "lit_ft.regularizers.L2SP"


class ParamChange(L.Callback):
    """Largest change of any weight over one optimizer step (BN statistics excluded)."""

    def __init__(self) -> None:
        self.max_step_change = 0.0

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self._before = [p.detach().clone() for p in module.model.parameters()]

    def on_train_batch_end(self, trainer, module, *args):
        d = torch.cat([(p.detach() - b).flatten() for p, b in zip(module.model.parameters(), self._before)])
        self.max_step_change = max(self.max_step_change, d.norm().item())


def test_gradient_clipping_and_early_stopping_from_a_config(tmp_path):
    cfg = {**TINY_YAML}
    cfg["model"] = {"backbone": "test_resnet", "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.1, "weight_decay": 0.0}}}
    cfg["trainer"] = {**cfg["trainer"], "max_epochs": 6, "gradient_clip_val": 0.01, "callbacks": [
        {"class_path": "lightning.pytorch.callbacks.EarlyStopping",
         "init_args": {"monitor": "val/acc", "mode": "max", "patience": 1, "min_delta": 2.0}},  # no gain can be >= 2
        {"class_path": "tests.test_regularizers.ParamChange"},
    ]}
    path = tmp_path / "clip.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cli = main(["fit", "--config", str(path)], return_cli=True)
    assert cli.trainer.current_epoch == 2  # stopped after patience=1 epoch without improvement, not 6
    change = next(c for c in cli.trainer.callbacks if type(c).__name__ == "ParamChange")  # imported by jsonargparse
    assert change.max_step_change <= 0.1 * 0.01 * 1.001  # |lr * clipped grad| <= lr * clip


def test_checkpoints_load_across_regularizer_configs(tmp_path):
    from lit_ft import ImageClassifier

    model = tiny_model(regularizers=[L2SP(), DELTA(layers=["layer4"])])
    t = trainer(tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=1)
    t.fit(model, tiny_data())
    t.save_checkpoint(tmp_path / "reg.ckpt")
    # From Python the regularizers are not hyperparameters: the plain model loads, extra state dropped.
    plain = ImageClassifier.load_from_checkpoint(tmp_path / "reg.ckpt", weights_only=True)
    assert len(plain.regularizers) == 0
    assert torch.equal(plain.model.fc.weight, model.model.fc.weight)
    # A checkpoint without regularizer state loads into a model with some (anchors: as built, warned).
    trainer(tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=0).fit(plain, tiny_data())
    plain.trainer.save_checkpoint(tmp_path / "plain.ckpt")
    with pytest.warns(UserWarning, match="no state for"):
        again = ImageClassifier.load_from_checkpoint(tmp_path / "plain.ckpt", weights_only=True, regularizers=[L2SP()])
    assert torch.equal(again.model.fc.weight, plain.model.fc.weight)

"""Structured pruning (lit-ft prune): channels really go, classes stay, the checkpoint rebuilds and trains."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from lit_ft import ImageClassifier, UserError
from lit_ft import channels as C
from lit_ft.cli import main
from lit_ft.prune import param_count, prune, prune_network, read_report, save_pruned
from tests.helpers import tiny_data, tiny_model, trainer
from tests.test_cli import TINY

pytest.importorskip("torch_pruning")
SIZE = (3, 32, 32)


def widths(net: nn.Module) -> dict[str, int]:
    return {n: m.weight.shape[0] for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


@pytest.mark.parametrize("backbone", ["test_resnet", "test_efficientnet", "resnet10t"])
def test_pruning_removes_the_requested_share_of_parameters_as_channels_and_keeps_the_classes(backbone, one_thread):
    model = tiny_model(backbone, num_classes=7)
    before, start = widths(model.model), param_count(model.model)
    report = prune(model, ratio=0.5, latency_rounds=0, input_size=SIZE)
    assert param_count(model.model) == start  # the model itself is left as it was
    assert report.params_before == start
    assert abs(report.removed - 0.5) <= 0.05, report.summary()  # within the library's channel granularity
    assert report.macs_after < 0.6 * report.macs_before
    # The pruned network, rebuilt from the checkpoint-free copy the report describes, is narrower
    # layer by layer (whole output channels gone), not masked: fewer rows in the weights.
    net = _pruned_copy(model, 0.5)
    after = widths(net)
    narrower = [n for n in before if after[n] < before[n]]
    assert len(narrower) >= len(before) // 2
    head = model.model.get_classifier()
    head_name = next(n for n, m in model.model.named_modules() if m is head)
    assert after[head_name] == 7  # the classes
    assert net(torch.randn(3, *SIZE)).shape == (3, 7)
    assert report.unpruned[0]["name"] == head_name and "7 classes" in report.unpruned[0]["reason"]


def _pruned_copy(model: ImageClassifier, ratio: float) -> nn.Module:
    import copy

    net = copy.deepcopy(model.model)
    prune_network(net, ratio, input_size=SIZE)
    return net.eval()


def test_a_pruned_checkpoint_rebuilds_its_architecture_through_pretrained(tmp_path, one_thread):
    import copy

    model = tiny_model("test_efficientnet", num_classes=5)
    net = copy.deepcopy(model.model)
    report = prune_network(net, 0.4, input_size=SIZE)
    out = save_pruned(model, net, tmp_path / "pruned.ckpt", report)
    ckpt = torch.load(out, weights_only=True)  # plain data only: weights_only loading works
    assert ckpt["hyper_parameters"]["backbone"] == "test_efficientnet"
    assert ckpt["lit_ft"]["class_names"] == model.class_names
    assert read_report(out)["params_after"] == report.params_after
    # timm alone cannot build it: the saved tensors are narrower than a fresh model's.
    fresh = ImageClassifier("test_efficientnet", num_classes=5)
    sd = {k[len("model."):]: v for k, v in ckpt["state_dict"].items()}
    assert any(fresh.model.state_dict()[k].shape != v.shape for k, v in sd.items() if k != C.MARKER)
    small = ImageClassifier("test_efficientnet", num_classes=5, pretrained=str(out))
    assert all(m.training for m in small.modules())  # built like any fresh model (tracing used eval mode)
    small.eval()
    assert param_count(small.model) == report.params_after
    assert C.pruned_from(small.model) == report.params_before
    x = torch.randn(4, *SIZE)
    assert torch.equal(small(x), net.eval()(x))  # the very network that was pruned


def test_a_pruned_checkpoint_tests_like_any_checkpoint(tmp_path, one_thread):
    model = tiny_model("test_resnet")
    L_trainer = trainer(tmp_path, max_epochs=2)
    L_trainer.fit(model, tiny_data())
    out = tmp_path / "pruned.ckpt"
    prune(model, ratio=0.3, out=out, latency_rounds=0, input_size=SIZE)
    small = ImageClassifier("test_resnet", num_classes=4, pretrained=str(out))
    metrics = trainer(tmp_path).test(small, tiny_data(), ckpt_path=str(out), weights_only=True, verbose=False)
    assert 0.0 <= metrics[0]["test/acc"] <= 1.0


def test_taylor_importance_keeps_other_channels_than_magnitude(one_thread):
    torch.manual_seed(0)
    model = tiny_model("test_resnet")
    dm = tiny_data()
    dm.setup("fit")
    batches = [b for _, b in zip(range(2), dm.train_dataloader())]
    import copy

    by_size, by_taylor = copy.deepcopy(model.model), copy.deepcopy(model.model)
    r1 = prune_network(by_size, 0.5, "magnitude", input_size=SIZE)
    r2 = prune_network(by_taylor, 0.5, "taylor", input_size=SIZE, calibration=batches)
    assert r1.params_after == r2.params_after and widths(by_size) == widths(by_taylor)  # same widths ...
    differ = [k for k, v in by_size.state_dict().items() if v.is_floating_point() and not torch.equal(v, by_taylor.state_dict()[k])]
    assert differ  # ... but other channels kept
    with pytest.raises(UserError, match="taylor importance needs training batches"):
        prune_network(copy.deepcopy(model.model), 0.5, "taylor", input_size=SIZE)


def test_iterative_steps_reach_the_same_size(one_thread):
    model = tiny_model("test_efficientnet")
    one = prune(model, ratio=0.5, steps=1, latency_rounds=0, input_size=SIZE)
    three = prune(model, ratio=0.5, steps=3, latency_rounds=0, input_size=SIZE)
    assert three.steps == 3 and abs(three.removed - 0.5) <= 0.05 and abs(three.removed - one.removed) <= 0.02


class TwoBranches(nn.Module):
    """A prunable branch, a one-channel branch and an embedding torch-pruning cannot follow."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 32, 3, padding=1)
        self.a2 = nn.Conv2d(32, 32, 3, padding=1)
        self.b = nn.Conv2d(3, 1, 3, padding=1)
        self.emb = nn.Embedding(1000, 8)  # 8,000 parameters no channel removal reaches
        self.fc = nn.Linear(32 + 1 + 8, 4)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        code = self.emb(torch.zeros(x.shape[0], dtype=torch.long, device=x.device))
        return self.fc(torch.cat([self.a2(self.a(x)).mean((2, 3)), self.b(x).mean((2, 3)), code], 1))


def test_layers_that_cannot_be_pruned_are_listed_with_the_reason():
    net = TwoBranches()
    report = prune_network(net, 0.3, input_size=(3, 16, 16))
    reasons = {u["name"]: u["reason"] for u in report.unpruned}
    assert set(reasons) == {"fc", "emb", "b"}
    assert "no pruning group" in reasons["emb"] and "kept all 1 output channels" in reasons["b"]
    assert net.a.out_channels < 32 and net.fc.in_features < 41
    text = report.summary()
    assert "not pruned (3)" in text and "emb: Embedding (weight)" in text


def test_mistakes_are_user_errors(one_thread):
    model = tiny_model("test_resnet")
    with pytest.raises(UserError, match="between 0 and 1"):
        prune(model, ratio=1.0, latency_rounds=0, input_size=SIZE)
    with pytest.raises(UserError, match="no longer runs"):  # attention heads: torch-pruning's shapes break timm's ViT
        prune(tiny_model("test_vit"), ratio=0.5, latency_rounds=0, input_size=SIZE)
    import copy

    net = copy.deepcopy(model.model)
    prune_network(net, 0.3, input_size=SIZE)
    with pytest.raises(UserError, match="pruned already"):
        prune_network(net, 0.3, input_size=SIZE)
    with pytest.raises(UserError, match="at most"):
        prune_network(TwoBranches(), 0.8, input_size=(3, 16, 16))


def test_latency_is_measured_before_and_after_side_by_side(one_thread):
    report = prune(tiny_model("test_resnet"), ratio=0.5, latency_rounds=1, input_size=SIZE)
    assert set(report.latency_ms) == {"before", "after"}
    assert set(report.latency_ms["before"]) == {1, 32} and all(v > 0 for v in report.latency_ms["after"].values())
    assert "CPU ms, batch 32" in report.summary()


@pytest.mark.slow
def test_prune_from_the_cli_then_fine_tune_the_smaller_model_through_fit_with_the_original_as_teacher(tmp_path, capsys):
    first = main(["fit", *TINY, "--trainer.max_epochs", "1"], return_cli=True)
    ckpt = Path(first.trainer.log_dir) / "checkpoints" / "last.ckpt"
    main(["prune", *TINY, "--ckpt_path", str(ckpt), "--ratio", "0.5", "--latency_rounds", "1"])
    text = capsys.readouterr().out
    out = ckpt.with_name("last-pruned50.ckpt")
    assert out.is_file() and "parameters" in text and "CPU ms, batch 1" in text and str(out) in text
    assert re.search(r"BatchNorm statistics: recomputed on \d+ training images in \d+ of \d+ BN layers", text)  # --bn_batches 32 by default
    report = read_report(out)
    assert abs(report["params_after"] / report["params_before"] - 0.5) <= 0.05

    # Recover with the unpruned model as the teacher.
    tuned = main(["fit", *TINY, "--trainer.max_epochs", "1", "--model.pretrained", str(out),
                  "--model.distill.teacher", str(ckpt)], return_cli=True)
    assert "train/kd_loss" in tuned.trainer.callback_metrics
    net = tuned.model.model
    assert param_count(net) == report["params_after"]
    start = ImageClassifier("test_resnet", num_classes=4, pretrained=str(out))
    changed = [k for k, v in start.model.state_dict().items() if v.is_floating_point() and not torch.equal(v, net.state_dict()[k])]
    assert changed  # it trained
    # The fine-tuned run's checkpoints carry the smaller architecture on: they load the same way.
    last = Path(tuned.trainer.log_dir) / "checkpoints" / "last.ckpt"
    again = ImageClassifier("test_resnet", num_classes=4, pretrained=str(last))
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in again.model.state_dict().items())
    # And --ckpt_path rebuilds the narrower network too: test the pruned and the fine-tuned weights.
    for path in (out, last):
        tested = main(["test", *TINY, "--ckpt_path", str(path)], return_cli=True)
        assert "test/acc" in tested.trainer.callback_metrics and param_count(tested.model.model) == report["params_after"]


def test_prune_command_needs_a_checkpoint_or_an_output(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["prune", *TINY, "--latency_rounds", "0"])
    assert exit.value.code == 2
    assert "lit-ft prune needs --ckpt_path" in capsys.readouterr().err


# --------------------------------------------------------------------------- BatchNorm statistics after pruning


def _scrambled_bn(model: ImageClassifier) -> None:
    """Running statistics unlike anything the data gives, so that a recomputed layer shows."""
    from lit_ft.weight_space import bn_layers

    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in bn_layers(model.model):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 3)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 4 + 0.5)


def _kept_values(after: torch.Tensor, before: torch.Tensor) -> bool:
    """Every value of the pruned layer's statistic is one of the unpruned layer's (channels kept, not recomputed)."""
    return bool(torch.isin(after, before).all())


def test_pruning_recomputes_bn_statistics_on_training_images_except_where_the_inputs_are_intact(tmp_path, one_thread):
    from lit_ft.prune import bn_layers_with_intact_inputs
    from lit_ft.weight_space import named_bn_layers
    from tests.test_soup import manual_bn_statistics

    model = tiny_model("test_efficientnet", num_classes=4)
    _scrambled_bn(model)
    dm = tiny_data(batch_size=16)
    report = prune(model, ratio=0.5, latency_rounds=0, input_size=SIZE, datamodule=dm, bn_batches=2, out=tmp_path / "p.ckpt")
    small = ImageClassifier("test_efficientnet", num_classes=4, pretrained=str(tmp_path / "p.ckpt")).eval()
    before, after = named_bn_layers(model.model), named_bn_layers(small.model)
    intact = bn_layers_with_intact_inputs(model.model, small.model)
    # The stem's BN and the first depthwise conv's BN see what they saw before (for the channels
    # kept); the first pointwise conv lost input channels, so every BN from there on sees new features.
    assert intact and intact[0] == "bn1" and len(intact) < len(after) // 2, intact
    assert f"in {len(after) - len(intact)} of {len(after)} BN layers" in report.bn and "32 training images" in report.bn
    assert "BatchNorm statistics: recomputed" in report.summary()
    for name in intact:  # kept: the unpruned model's values of the channels left
        assert _kept_values(after[name].running_mean, before[name].running_mean), name
    # The others equal a manual pass over the same 2 batches of training images (eval transform),
    # made on a copy (the pass itself moves the copy's running statistics).
    import copy

    batches = list(dm.eval_dataloader("train", limit=2 * dm.eval_batch_size))
    probe = copy.deepcopy(small.model)
    means, variances = manual_bn_statistics(probe, batches, keep=intact)
    by_name = {m: n for n, m in probe.named_modules()}
    expected = {by_name[m]: (means[m], variances[m]) for m in means}
    assert set(expected) == set(after) - set(intact)
    for name, (mean, var) in expected.items():
        torch.testing.assert_close(after[name].running_mean, mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(after[name].running_var, var, rtol=1e-4, atol=1e-5)
        assert not _kept_values(after[name].running_mean, before[name].running_mean), name


def test_bn_batches_0_or_no_data_keeps_the_unpruned_statistics_and_says_so(tmp_path, one_thread):
    from lit_ft.weight_space import named_bn_layers

    model = tiny_model("test_efficientnet")
    _scrambled_bn(model)
    before = named_bn_layers(model.model)
    for i, (kw, said) in enumerate([({"datamodule": tiny_data(), "bn_batches": 0}, "bn_batches: 0"), ({}, "no data")]):
        out = tmp_path / f"p{i}.ckpt"
        report = prune(model, ratio=0.5, latency_rounds=0, input_size=SIZE, out=out, **kw)
        assert report.bn.startswith("kept from the unpruned model") and said in report.bn
        small = ImageClassifier("test_efficientnet", num_classes=4, pretrained=str(out))
        after = named_bn_layers(small.model)
        assert all(_kept_values(m.running_mean, before[n].running_mean) for n, m in after.items())
    with pytest.raises(UserError, match="bn_batches must be >= 0"):
        prune(model, ratio=0.5, latency_rounds=0, input_size=SIZE, datamodule=tiny_data(), bn_batches=-1)


def test_a_network_without_batchnorm_has_nothing_to_recompute():
    from lit_ft.prune import recalibrate_bn_after_pruning

    before, after = TwoBranches(), TwoBranches()
    prune_network(after, 0.3, input_size=(3, 16, 16))
    assert recalibrate_bn_after_pruning(before, after, tiny_model(), tiny_data(), 2) is None

"""model.head_init: how a fresh classifier starts, and that a loaded head is never touched."""

import math

import pytest
import timm
import torch
import torch.nn.functional as F

from lit_ft import backbones as B
from lit_ft.errors import UserError
from lit_ft import ImageClassifier


def _build(name, head_init, num_classes=10, pretrained=False, seed=0):
    torch.manual_seed(seed)
    return B.create_backbone(name, num_classes=num_classes, pretrained=pretrained, head_init=head_init)


def _initial_loss(model, num_classes=10):
    torch.manual_seed(1)
    x, y = torch.rand(32, 3, 64, 64), torch.randint(0, num_classes, (32,))
    with torch.no_grad():
        return F.cross_entropy(model.eval()(x), y).item()


def test_zeros_head_starts_at_ln_c_and_leaves_the_body_as_timm_made_it():
    timm_init, zeros = _build("test_efficientnet", "timm"), _build("test_efficientnet", "zeros")
    head = set(B.W.classifier_keys(zeros))
    assert head == {"classifier.weight", "classifier.bias"}
    a, b = timm_init.state_dict(), zeros.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if k not in head)
    assert not zeros.classifier.weight.any() and not zeros.classifier.bias.any()
    assert _initial_loss(zeros) == pytest.approx(math.log(10), abs=1e-6)


def test_efficientnet_timm_head_is_large_and_normal_head_is_small():
    """Why head_init exists: timm's EfficientNet head init gives logits of several units."""
    timm_init, normal = _build("test_efficientnet", "timm"), _build("test_efficientnet", "normal")
    # timm: uniform(+-1/sqrt(num_classes)) -> std 1/sqrt(3 * 10) = 0.18; normal: std 0.01.
    assert timm_init.classifier.weight.std().item() == pytest.approx(1 / math.sqrt(30), rel=0.1)
    assert normal.classifier.weight.std().item() == pytest.approx(0.01, rel=0.1)
    assert not normal.classifier.bias.any()
    assert abs(_initial_loss(normal) - math.log(10)) < 0.05


def test_head_loaded_from_weights_is_never_reinitialised(tmp_path):
    torch.manual_seed(3)
    sd = timm.create_model("test_resnet", num_classes=10).state_dict()
    torch.save(sd, tmp_path / "w.pth")
    same = B.create_backbone("test_resnet", 10, str(tmp_path / "w.pth"), head_init="zeros")
    assert torch.equal(same.fc.weight, sd["fc.weight"]) and torch.equal(same.fc.bias, sd["fc.bias"])
    other = B.create_backbone("test_resnet", 3, str(tmp_path / "w.pth"), head_init="zeros")  # head does not fit
    assert not other.fc.weight.any()
    assert torch.equal(other.layer1[0].conv1.weight, sd["layer1.0.conv1.weight"])


def test_zeros_head_trains_and_passes_gradient_to_the_backbone_after_one_step():
    torch.manual_seed(0)
    model = ImageClassifier(backbone="test_efficientnet", num_classes=4, head_init="zeros")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 4, (8,))
    stem = model.model.conv_stem.weight
    for step in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        # A zero head sends no gradient into the body on the first step, only on the second.
        assert (stem.grad is not None and stem.grad.abs().sum() > 0) == (step == 1)
        assert model.model.classifier.weight.grad.abs().sum() > 0
        opt.step()


def test_unknown_head_init_is_refused():
    with pytest.raises(UserError, match="(?s)unknown head_init 'xavier'.*timm, zeros, normal"):
        B.create_backbone("test_resnet", 3, head_init="xavier")


@pytest.mark.parametrize("num_classes, fresh", [(3, True), (10, False)])
def test_hub_weights_head_is_reinitialised_only_when_timm_dropped_it(monkeypatch, num_classes, fresh):
    """``pretrained: true``: timm keeps the hub classifier only when the class count matches."""
    real = timm.create_model

    def fake_hub(name, pretrained=False, **kw):  # no network here: a random model posing as hub weights
        torch.manual_seed(0)
        model = real(name, **kw)
        model.pretrained_cfg = {**model.pretrained_cfg, "num_classes": 10}
        return model

    monkeypatch.setattr(B.timm, "create_model", fake_hub)
    model = B.create_backbone("test_resnet", num_classes, pretrained=True, head_init="zeros")
    assert (not model.fc.weight.any()) == fresh

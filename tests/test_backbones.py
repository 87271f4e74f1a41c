import pytest
import timm

from lit_ft import backbones as B
from lit_ft.errors import UserError

FAMILIES = ["test_resnet", "test_efficientnet", "test_convnext", "test_vit", "regnetx_002", "mobilenetv3_small_050"]


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("granularity", ["coarse", "fine"])
def test_every_parameter_in_exactly_one_group(name, granularity):
    model = timm.create_model(name, num_classes=5)
    groups = B.layer_groups(model, granularity)
    flat = [n for g in groups for n in g.param_names]
    assert sorted(flat) == sorted(n for n, _ in model.named_parameters())
    assert len(flat) == len(set(flat))
    assert groups[0].name == "stem"
    assert groups[-1].name == "head"
    head_params = {n for n, _ in model.get_classifier().named_parameters()}
    assert {n.rsplit(".", 1)[-1] for n in groups[-1].param_names} == {n.rsplit(".", 1)[-1] for n in head_params}
    assert len(groups) >= 4


def test_fine_groups_are_finer_than_coarse():
    model = timm.create_model("regnetx_002", num_classes=5)
    assert len(B.layer_groups(model, "fine")) > len(B.layer_groups(model, "coarse"))


def test_model_without_group_matcher_falls_back_to_children():
    import torch.nn as nn

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(2, 3)
            self.b = nn.Linear(3, 3)
            self.fc = nn.Linear(3, 2)

        def get_classifier(self):
            return self.fc

    groups = B.layer_groups(Tiny())
    assert [g.name for g in groups] == ["a", "b", "head"]


def test_resolve_group_by_name_and_negative_index():
    names = ["stem", "layer1", "head"]
    assert B.resolve_group("head", names) == 2
    assert B.resolve_group(-1, names) == 2
    assert B.resolve_group("-2", names) == 1
    with pytest.raises(UserError, match="(?s)no layer group 'layer9'.*stem, layer1, head"):
        B.resolve_group("layer9", names)


def test_unknown_backbone_suggests_close_names():
    with pytest.raises(UserError) as err:
        B.create_backbone("efficientnet_lite00", num_classes=3)
    assert "unknown timm backbone 'efficientnet_lite00'" in str(err.value)
    assert "efficientnet_lite0" in str(err.value)


def test_data_config_comes_from_pretrained_cfg():
    model = timm.create_model("efficientnet_lite0", num_classes=3)
    cfg = B.data_config(model)
    assert cfg["input_size"] == (3, 224, 224)
    assert cfg["interpolation"] == "bicubic"
    assert cfg["mean"] == pytest.approx((0.485, 0.456, 0.406))

import pytest
import timm

from lit_ft import backbones as B
from lit_ft.errors import UserError

FAMILIES = ["test_resnet", "test_efficientnet", "test_convnext", "test_vit", "regnetx_002", "mobilenetv3_small_050", "test_mambaout"]


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


# --------------------------------------------------------------------------- module ownership (train/eval modes)

MODE_FAMILIES = ["test_resnet", "test_efficientnet", "test_vit", "resnet10t", "test_convnext", "test_vit_relpos", "mobilenetv3_small_050"]


def _acts_differently_in_train_mode(module) -> bool:
    """Tracks running statistics, overrides ``train``, or reads ``self.training`` in a forward method."""
    import inspect

    import torch.nn as nn

    if B.tracks_running_stats(module) or type(module).train is not nn.Module.train:
        return True
    for klass in type(module).__mro__:
        if klass in (nn.Module, object):
            continue
        for attr, fn in vars(klass).items():
            if attr.lstrip("_").startswith("forward") and callable(fn):
                try:
                    if "self.training" in inspect.getsource(fn):
                        return True
                except (OSError, TypeError):
                    continue
    return False


@pytest.mark.parametrize("name", MODE_FAMILIES)
@pytest.mark.parametrize("granularity", ["coarse", "fine"])
def test_every_module_with_train_eval_behaviour_is_in_exactly_one_group(name, granularity):
    from collections import Counter

    model = timm.create_model(name, num_classes=5, drop_rate=0.1, drop_path_rate=0.1)
    groups = B.layer_groups(model, granularity)
    owners = Counter(m for g in groups for m in g.modules)
    assert max(owners.values()) == 1
    group_of = {n: i for i, g in enumerate(groups) for n in g.param_names}
    behaving = [n for n, m in model.named_modules() if n and _acts_differently_in_train_mode(m)]
    assert len(behaving) >= 5, behaving  # Dropout, DropPath, BatchNorm, attention, ... exist
    for n in behaving:
        assert owners[n] == 1, f"{name}: {n} ({type(model.get_submodule(n)).__name__}) is in no layer group"
    # The model itself aside (its functional head dropout follows the model's mode, i.e. the
    # head's), a module is in no group only if its parameters span several groups.
    for n, m in model.named_modules():
        if owners[n] == 0:
            spans = {group_of[f"{n}.{p}" if n else p] for p, _ in m.named_parameters()}
            assert len(spans) > 1, f"{name}: {n} is in no group but all its parameters are in one"


def test_parameterless_modules_go_with_the_module_they_feed():
    names = lambda groups, g: next(x.modules for x in groups if x.name == g)  # noqa: E731
    vit = B.layer_groups(timm.create_model("test_vit", num_classes=5, drop_rate=0.1))
    assert {"pos_drop", "patch_drop", "norm_pre"} <= set(names(vit, "blocks.0"))
    assert {"head_drop", "head"} <= set(names(vit, "head"))
    resnet = B.layer_groups(timm.create_model("resnet10t", num_classes=5))
    assert {"global_pool", "fc"} <= set(names(resnet, "head"))
    assert "maxpool" in names(resnet, "layer1")
    convnext = B.layer_groups(timm.create_model("test_convnext", num_classes=5, drop_rate=0.1))
    assert {"head.drop", "head.fc"} <= set(names(convnext, "head"))


# --------------------------------------------------------------------------- weight decay


def test_vit_tokens_and_embeddings_take_no_weight_decay_from_the_models_own_list():
    model = timm.create_model("test_vit", num_classes=5)
    names = B.no_weight_decay_names(model)
    params = dict(model.named_parameters())
    assert {"cls_token", "pos_embed"} <= names and params["pos_embed"].ndim == 3  # only the model's list says so
    assert {"blocks.0.attn.qkv.bias", "blocks.0.norm1.weight", "norm.weight", "head.bias"} <= names
    assert not {"blocks.0.attn.qkv.weight", "patch_embed.proj.weight", "head.weight"} & names


def test_a_cnn_without_a_no_weight_decay_list_exempts_its_1d_parameters_only():
    model = timm.create_model("test_resnet", num_classes=5)
    assert not hasattr(model, "no_weight_decay")
    names = B.no_weight_decay_names(model)
    params = dict(model.named_parameters())
    assert names == {n for n, p in params.items() if p.ndim == 1}
    assert {"bn1.weight", "fc.bias"} <= names and "fc.weight" not in names and "conv1.0.weight" not in names


@pytest.mark.parametrize("name", ["test_vit", "test_resnet", "test_convnext", "xcit_nano_12_p16_224", "test_vit_relpos"])
def test_no_weight_decay_split_is_timms_own(name):
    import torch
    from timm.optim import param_groups_weight_decay

    with torch.device("meta"):
        model = timm.create_model(name, num_classes=5)
    ours = B.no_weight_decay_names(model)
    no_decay, _ = param_groups_weight_decay(model, 0.05, no_weight_decay_list=model.no_weight_decay() if hasattr(model, "no_weight_decay") else ())
    assert no_decay["weight_decay"] == 0.0
    by_id = {id(p): n for n, p in model.named_parameters()}
    assert ours == {by_id[id(p)] for p in no_decay["params"]}


def test_layers_inside_the_classifier_module_are_a_group_of_their_own():
    # MambaOut/CoAtNet/MetaFormer heads hold a norm and a pre-logits MLP besides the classifier.
    groups = B.layer_groups(timm.create_model("test_mambaout", num_classes=5))
    assert [g.name for g in groups[-2:]] == ["head.norm+pre_logits", "head"]
    assert all(n.startswith(("head.norm.", "head.pre_logits.")) for n in groups[-2].param_names)
    assert groups[-1].param_names == ["head.fc.weight", "head.fc.bias"]

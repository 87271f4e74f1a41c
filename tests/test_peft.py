"""PEFT (lit_ft.peft): LoRA/DoRA/(IA)^3 adapters from HF peft and BitFit, inside the layer groups,
freeze plans, learning rates, checkpoints, EMA and DDP; merging; the adapter file."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import timm
import torch
import yaml
from safetensors.torch import save_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

pytest.importorskip("peft")

from lit_ft import ImageClassifier  # noqa: E402
from lit_ft import peft as P  # noqa: E402
from lit_ft.callbacks import EMA  # noqa: E402
from lit_ft.cli import main  # noqa: E402
from lit_ft.errors import UserError  # noqa: E402
from lit_ft.plan import TrainingPlan  # noqa: E402
from lit_ft.regularizers import L2SP  # noqa: E402
from lit_ft.schedules import FreezeUnfreeze  # noqa: E402
from tests.helpers import snapshot, tiny_data, tiny_model, trainer  # noqa: E402
from tests.test_cli import TINY  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def base_file(tmp_path: Path, backbone: str) -> str:
    """A 'pretrained' base for ``backbone``: timm's random init with every norm layer's scale drawn
    from U(0.5, 1.5). (timm zero-initialises the last BatchNorm of each ResNet block, which would
    multiply every adapter in the block by 0.)"""
    model = timm.create_model(backbone, num_classes=4)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
                m.weight.uniform_(0.5, 1.5)
    path = tmp_path / f"{backbone}-base.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


def perturb_trainables(model: ImageClassifier, scale: float = 0.1) -> None:
    """Move every parameter that can train away from its start (a stand-in for training)."""
    gen = torch.Generator().manual_seed(0)
    fixed = set(P.fixed_names(model.groups))
    with torch.no_grad():
        for n, p in model.model.named_parameters():
            if n not in fixed:
                p.add_(scale * torch.randn(p.shape, generator=gen))


def params(model: ImageClassifier) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.model.named_parameters()}


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize(
    ("backbone", "method"),
    [("test_vit", "dora"), ("test_resnet", "lora"), ("test_efficientnet", "ia3"), ("test_resnet", "bitfit")],
)
def test_a_fit_changes_exactly_the_adapters_head_and_bitfit_biases_and_the_base_stays_bit_identical(tmp_path, backbone, method):
    model = tiny_model(backbone, pretrained=base_file(tmp_path, backbone), peft=P.PEFT(method=method, r=4))
    fixed = set(P.fixed_names(model.groups))
    adapters = set(P.adapter_names(model.model))
    before = params(model)
    trainer(tmp_path, max_epochs=2).fit(model, tiny_data())
    after = params(model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == set(before) - fixed  # every parameter that may train did; no base weight moved
    assert set(model.groups[-1].param_names) <= changed  # the head trains fully
    if method == "bitfit":
        assert not adapters and all(n.endswith(".bias") for n in changed - set(model.groups[-1].param_names))
    else:
        assert adapters and adapters <= changed
    assert len(fixed) > len(changed)  # most of the model is the fixed base
    assert all(not dict(model.model.named_parameters())[n].requires_grad for n in fixed)


def test_a_freeze_plan_never_turns_the_base_weights_on_even_with_train_bn(tmp_path):
    # LP then LoRA: epoch 0 trains the head only, epoch 1 the adapters too; train_bn would turn
    # BatchNorm weights of frozen groups on, but under PEFT they are base weights: fixed.
    model = tiny_model("test_resnet", peft=P.PEFT(r=2), freeze=FreezeUnfreeze(epochs=1, train_bn=True))
    plan = TrainingPlan(model.freeze, steps_per_epoch=4, epochs=2)
    fixed = set(P.fixed_names(model.groups))
    adapters = set(P.adapter_names(model.model))
    head = set(model.groups[-1].param_names)
    bn = {n for n in fixed if ".bn" in n or n.startswith("bn")}
    assert bn  # BatchNorm weights exist, and they are fixed
    model.runner.mark_ever_trainable(plan)  # what DDP sees: adapters + head
    on = {n for n, p in model.model.named_parameters() if p.requires_grad}
    assert on == adapters | head
    model.runner.apply(plan.trainable(0, 0))
    assert {n for n, p in model.model.named_parameters() if p.requires_grad} == head
    model.runner.apply(plan.trainable(1, 4))
    assert {n for n, p in model.model.named_parameters() if p.requires_grad} == adapters | head


def test_layer_decay_scales_each_adapters_lr_by_the_depth_of_the_group_of_the_module_it_adapts():
    model = tiny_model("test_vit", peft=P.PEFT(method="dora", r=2), layer_decay=0.5)
    optimizer = model.configure_optimizers()["optimizer"]
    names = [g.name for g in model.groups]  # stem, blocks.0 ... blocks.5, head
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    decay_of = {id(p): g.get("weight_decay", 1e-4) for g in optimizer.param_groups for p in g["params"]}
    named = dict(model.model.named_parameters())
    checked = 0
    for n in P.adapter_names(model.model):
        block = ".".join(n.split(".")[:2])  # blocks.3.attn.qkv.lora_A.default.weight -> blocks.3
        depth = len(names) - 1 - names.index(block)
        assert lr_of[id(named[n])] == pytest.approx(0.05 * 0.5**depth), n
        # DoRA's magnitudes are per-channel scales: no weight decay pulling them to 0
        assert (decay_of[id(named[n])] == 0.0) == ("magnitude" in n), n
        checked += 1
    assert checked == 6 * 4 * 3  # 6 blocks x (qkv, proj, fc1, fc2) x (A, B, magnitude)


def test_ia3_scales_take_no_weight_decay_while_lora_matrices_do():
    for method, decayed in (("ia3", False), ("lora", True)):
        model = tiny_model("test_efficientnet", peft=P.PEFT(method=method, r=2))
        optimizer = model.configure_optimizers()["optimizer"]
        decay_of = {id(p): g.get("weight_decay", 1e-4) for g in optimizer.param_groups for p in g["params"]}
        named = dict(model.model.named_parameters())
        adapters = P.adapter_names(model.model)
        assert adapters and all((decay_of[id(named[n])] > 0) == decayed for n in adapters), method


def test_ema_of_a_lora_model_keeps_the_base_weights_and_averages_the_adapters(tmp_path):
    model = tiny_model("test_vit", peft=P.PEFT(r=2))
    before = params(model)
    ema = EMA(decay=0.5)
    t = trainer(tmp_path, max_epochs=2, callbacks=[ema])
    t.fit(model, tiny_data())
    after = params(model)  # the averaged weights, after training
    fixed = P.fixed_names(model.groups)
    assert all(torch.equal(before[n], after[n]) for n in fixed)
    assert all(not torch.equal(before[n], after[n]) for n in P.adapter_names(model.model))
    # A model built from Python keeps its PEFT config in the checkpoint as plain data.
    t.save_checkpoint(tmp_path / "m.ckpt")
    loaded = ImageClassifier.load_from_checkpoint(tmp_path / "m.ckpt", weights_only=True)
    assert loaded.peft == model.peft and P.tuner_layers(loaded.model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())


# ----------------------------------------------------------------------------- merging, files


@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "bitfit"])
@pytest.mark.parametrize("backbone", ["test_vit", "test_efficientnet"])
def test_the_merged_plain_timm_model_gives_the_adapted_models_logits(tmp_path, backbone, method):
    model = tiny_model(backbone, pretrained=base_file(tmp_path, backbone), peft=P.PEFT(method=method, r=4, dropout=0.1))
    base = timm.create_model(backbone, num_classes=4).eval()
    base.load_state_dict(ImageClassifier(backbone, num_classes=4, pretrained=base_file(tmp_path, backbone)).model.state_dict())
    perturb_trainables(model)
    model.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        adapted = model(x)
        merged = P.merge(model)
        assert not P.tuner_layers(merged)
        assert bool(P.tuner_layers(model.model)) == (method != "bitfit")
        plain = timm.create_model(backbone, num_classes=4).eval()
        plain.load_state_dict(merged.state_dict())  # strict: plain timm keys, nothing left over
        got = plain(x)
        assert torch.allclose(got, adapted, rtol=1e-4, atol=1e-5), (got - adapted).abs().max()
        assert (base(x) - adapted).abs().max() > 100 * (got - adapted).abs().max()  # the adapters did matter
        assert torch.equal(model(x), adapted)  # merging left the adapted model as it was


def test_adapters_alone_rebuild_the_adapted_model_from_the_base_reference(tmp_path):
    base = base_file(tmp_path, "test_vit")
    model = tiny_model("test_vit", pretrained=base, peft=P.PEFT(r=4), class_names=list("abcd"))
    perturb_trainables(model)
    out = P.save_adapters(model, tmp_path / "adapters")
    adapter_bytes = (out / P.ADAPTER_FILE).stat().st_size
    assert adapter_bytes < 0.15 * Path(base).stat().st_size  # adapters + head only
    record = json.loads((out / P.CONFIG_FILE).read_text())
    assert record["base"] == base and record["backbone"] == "test_vit" and record["class_names"] == list("abcd")
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4  # peft's own record
    net = P.load_adapters(out).eval()
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(net(x), model(x))
    # Other base weights under the same name: refused, not silently other predictions.
    other = timm.create_model("test_vit", num_classes=4)
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, base)
    with pytest.raises(UserError, match="differ from those the adapters .* were trained on"):
        P.load_adapters(out)


def test_adapters_of_a_randomly_initialised_base_are_refused_with_a_hint(tmp_path):
    model = tiny_model("test_vit", peft=P.PEFT(r=2))
    with pytest.raises(UserError, match="randomly initialised") as err:
        P.save_adapters(model, tmp_path / "a")
    assert "merged model" in err.value.hint


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("backbone", "target", "problem", "hint"),
    [
        ("test_vit", "q_proj", "'q_proj' matches no adaptable module (nn.Linear, ungrouped nn.Conv2d) of VisionTransformer",
         "candidates: patch_embed.proj, attn.qkv, attn.proj, mlp.fc1, mlp.fc2"),
        ("test_vit", "head", "head is the classifier, which always trains fully", "attn.qkv"),
        ("test_efficientnet", "conv_dw", "grouped/depthwise conv (groups=", "conv_pw"),
        ("test_efficientnet", "blocks.0.0", "blocks.0.0 is a ConvBnAct: target its blocks.0.0.conv", "blocks.conv"),
        ("eva02_tiny_patch14_224", "attn.qkv", "the forward pass never calls blocks.0.attn.qkv (its parent reads "
         "blocks.0.attn.qkv.weight itself)", "attn.proj"),
    ],
    ids=["unknown", "head", "depthwise", "container", "bypassed"],
)
def test_a_target_module_that_cannot_be_adapted_is_one_clear_error_listing_candidates(backbone, target, problem, hint):
    with pytest.raises(UserError) as err:
        tiny_model(backbone, peft=P.PEFT(target_modules=[target]))
    assert problem in err.value.problem and hint in err.value.hint


def test_default_targets_leave_out_a_module_whose_parent_bypasses_its_forward():
    # EVA computes F.linear(x, qkv.weight, cat(q_bias, k_bias, v_bias)): a LoRA on qkv would
    # train nothing and then merge into the weight, changing the model.
    model = tiny_model("eva02_tiny_patch14_224", peft=P.PEFT(r=2))
    adapted = P.tuner_layers(model.model)
    assert adapted and not [n for n in adapted if n.endswith("qkv")]
    assert {n.rsplit(".", 1)[-1] for n in adapted} == {"proj", "fc1", "fc2"}


def test_a_family_without_defaults_gets_every_linear_and_conv_outside_the_stem_and_head():
    model = tiny_model("test_byobnet", peft=P.PEFT(r=2))
    adapted = set(P.tuner_layers(model.model))
    stem, head = model.groups[0], model.groups[-1]
    assert stem.name == "stem" and len(adapted) > 10
    owners = lambda g: {n.rsplit(".", 1)[0].replace(".base_layer", "") for n in g.param_names}  # noqa: E731
    assert not adapted & (owners(stem) | owners(head))
    plain = [n for n, m in model.model.named_modules()  # ungrouped convs left without an adapter
             if type(m) is nn.Conv2d and m.groups == 1 and ".lora_" not in n and not n.endswith(".base_layer")]
    assert plain and set(plain) <= owners(stem)  # only the stem's


def test_an_unknown_target_from_the_command_line_is_one_line_and_a_hint(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", *TINY, "--model.backbone", "test_vit", "--model.peft", "{method: lora, target_modules: [q_proj]}"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert "lit-ft: error: peft.target_modules: 'q_proj' matches no adaptable module" in err
    assert "HINT: candidates: patch_embed.proj, attn.qkv, attn.proj, mlp.fc1, mlp.fc2 (closest: attn.proj)" in err


def test_l2sp_refuses_lora_and_anchors_only_the_trained_biases_under_bitfit():
    with pytest.raises(UserError, match=r"with model.peft \(lora\) those weights never train") as err:
        tiny_model("test_vit", peft=P.PEFT(r=2), regularizers=[L2SP()])
    assert "remove L2SP" in err.value.hint
    model = tiny_model("test_vit", peft=P.PEFT(method="bitfit"), regularizers=[L2SP()])
    anchors = [n for n, _ in model.regularizers[0].named_buffers()]
    assert anchors and all(n.endswith("__bias") for n in anchors)


# ----------------------------------------------------------------------------- CLI, checkpoints, resume


def test_cli_fit_shows_the_adapter_fraction_and_test_from_the_checkpoint_rebuilds_the_adapted_model(tmp_path):
    peft = ["--model.backbone", "test_vit", "--model.peft", "{method: lora, r: 4}"]
    cli = main(["fit", *TINY, *peft, "--trainer.max_epochs", "1"], return_cli=True)
    run = Path(cli.trainer.log_dir)
    assert "trainable" in cli.model.plan_table and "PEFT lora r=4 alpha=4 on 24 modules" in cli.model.plan_table
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
    acc.Reload()
    groups = cli.model.groups
    total = sum(g.num_params(cli.model.model) for g in groups)
    trainable = sum(g.num_trainable(cli.model.model) for g in groups)
    assert acc.Scalars("trainable_params")[-1].value == trainable
    assert acc.Scalars("trainable_fraction")[-1].value == pytest.approx(trainable / total)
    assert yaml.safe_load((run / "hparams.yaml").read_text())["peft"]["r"] == 4
    last = run / "checkpoints" / "last.ckpt"
    # A new process: the model is built from the checkpoint's hparams (with the adapters), then loaded.
    tested = main(["test", *TINY, "--model.backbone", "test_vit", "--ckpt_path", str(last)], return_cli=True)
    assert P.tuner_layers(tested.model.model)
    state = torch.load(last, weights_only=True)["state_dict"]
    assert all(torch.equal(v, state[k]) for k, v in tested.model.state_dict().items())
    assert "test/acc" in tested.trainer.callback_metrics
    loaded = ImageClassifier.load_from_checkpoint(last, weights_only=True)  # from Python, too
    assert loaded.peft == tested.model.peft and all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())
    # Its weights as `pretrained` for a new run: a clear error, not a key-mismatch trace.
    with pytest.raises(UserError, match="holds a model with PEFT adapters"):
        ImageClassifier("test_vit", num_classes=4, pretrained=str(last))


@pytest.mark.slow
def test_mid_epoch_interrupt_and_resume_with_adapters_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    from tests.test_recipe_guarantees import RECIPE, STEPS

    # The shipped recipe's moving parts (layer decay, warm-up + cosine, LP then the adapters with an
    # unfreeze warm-up, augmentation, workers), with LoRA dropout drawing from the step's RNG.
    args = ["fit", *RECIPE, "--model.peft", "{method: lora, r: 4, dropout: 0.1}"]
    ref = tmp_path / "ref"
    ref.mkdir()
    monkeypatch.chdir(ref)
    full = snapshot(main(args, return_cli=True).model)
    run = tmp_path / "run"
    run.mkdir()
    monkeypatch.chdir(run)
    with pytest.raises(SystemExit) as exit_:  # Ctrl-C in epoch 1 (the adapters train), after its 2nd batch
        main([*args, "--trainer.callbacks+=tests.test_interrupt.SignalAt", "--trainer.callbacks.step", "7",
              "--trainer.callbacks.signum", str(int(signal.SIGINT))])
    assert exit_.value.code == 128 + signal.SIGINT
    cli = main([*args, "--ckpt_path", "last"], return_cli=True)
    assert cli.trainer.global_step == STEPS
    got = snapshot(cli.model)
    trained = [k for k in got if ".lora_B." in k]  # B starts at 0: nonzero once the adapters trained
    assert trained and all(got[k].abs().sum() > 0 for k in trained)
    different = [k for k in got if not torch.equal(got[k], full[k])]
    assert not different, f"{len(different)} of {len(got)} tensors differ from the uninterrupted run, e.g. {different[:3]}"


@pytest.mark.slow
def test_ddp_with_lora_after_a_linear_probe_keeps_ranks_identical_and_the_base_fixed(tmp_path):
    from tests.test_ddp import assert_ranks_identical, run_ddp

    r0, r1 = run_ddp("peft", tmp_path, 700)
    assert_ranks_identical(r0, r1)
    assert_ranks_identical(r0, r1, key="ema")
    changed = lambda k: not torch.equal(r0["before"][k], r0["after"][k])  # noqa: E731
    adapters = [k for k in r0["after"] if ".lora_" in k]
    base = [k for k in r0["after"] if ".base_layer." in k]
    assert adapters and base
    assert all(changed(k) for k in adapters)  # trained from epoch 1 on, and all-reduced
    assert not any(changed(k) for k in base)
    assert changed("model.fc.weight")

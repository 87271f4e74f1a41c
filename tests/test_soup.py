"""Model soups and the weight-space operations under them: averaging, BatchNorm recalibration,
the greedy recipe, compatibility checks, and the soup as an ordinary lit-ft checkpoint."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import torch

from lit_ft import ImageClassifier
from lit_ft import weight_space as W
from lit_ft.cli import main
from lit_ft.errors import UserError
from lit_ft.experiment import evaluate
from lit_ft.soup import expand_paths, load_ingredients, make_soup
from tests.helpers import tiny_data, tiny_model
from tests.test_cli import TINY
from tests.tiny_runs import pretrained_file, train_run

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three runs from one starting point (two good, one trained on shuffled labels) and two
    that cannot join them (another backbone; other starting weights)."""
    root = tmp_path_factory.mktemp("soup_runs")
    start = pretrained_file(root)
    out = {
        "a": train_run(root, "a", start, lr=0.05, seed=0),
        "b": train_run(root, "b", start, lr=0.02, seed=1),
        "bad": train_run(root, "bad", start, lr=0.2, seed=2, epochs=4, difficulty="random"),
        "vit": train_run(root, "vit", pretrained_file(root, "test_vit"), backbone="test_vit", epochs=1),
        "other_start": train_run(root, "other_start", pretrained_file(root, seed=7), epochs=1),
    }
    return out


def images(n=8):
    dm = tiny_data()
    dm.setup("test")
    return torch.stack([dm.test_dataset[i][0] for i in range(n)])


def logits(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


# --------------------------------------------------------------------------- averaging


def test_the_average_of_identical_states_is_bit_identical_and_of_two_is_their_midpoint():
    a = {"w": torch.randn(5, 3), "n": torch.tensor(7)}
    b = {"w": torch.randn(5, 3), "n": torch.tensor(9)}
    same = W.average([a, a, a])
    assert torch.equal(same["w"], a["w"]) and torch.equal(same["n"], a["n"])
    torch.testing.assert_close(W.average([a, b])["w"], (a["w"] + b["w"]) / 2)
    torch.testing.assert_close(W.average([a, b], [3, 1])["w"], 0.75 * a["w"] + 0.25 * b["w"])
    assert torch.equal(W.average([a, b])["n"], a["n"])  # integer counters come from the first


def test_a_uniform_soup_of_two_copies_of_a_checkpoint_gives_the_same_logits(runs, tmp_path):
    copy = tmp_path / "copy.ckpt"
    shutil.copy(runs["a"], copy)
    x = images()
    alone = logits(ImageClassifier.load_from_checkpoint(runs["a"], weights_only=True, pretrained=False), x)
    # BN statistics kept (averaged): the soup is the checkpoint itself
    soup = make_soup([runs["a"], copy], tiny_data(), "uniform", bn_batches=0, accelerator="cpu")
    assert torch.equal(logits(soup.model, x), alone)
    assert [r["in_soup"] for r in soup.rows[:2]] == [True, True]


def test_a_network_without_batchnorm_needs_no_recalibration_and_averages_exactly(runs, tmp_path):
    copy = tmp_path / "vit_copy.ckpt"
    shutil.copy(runs["vit"], copy)
    soup = make_soup([runs["vit"], copy], tiny_data(), "uniform", bn_batches=8, accelerator="cpu")
    x = images()
    alone = ImageClassifier.load_from_checkpoint(runs["vit"], weights_only=True, pretrained=False)
    assert torch.equal(logits(soup.model, x), logits(alone, x))
    assert soup.checkpoint["lit_ft"]["soup"]["bn"] == "none in this network"


# --------------------------------------------------------------------------- BN recalibration


def manual_bn_statistics(model, batches, keep=()):
    """Per BN layer: the mean over batches of each batch's per-channel mean and unbiased
    variance of the layer's input, with only BN layers (except ``keep``) in train mode (what
    recalibration promises)."""
    layers = [m for name, m in W.named_bn_layers(model).items() if name not in keep]
    seen = {m: [] for m in layers}
    hooks = [m.register_forward_pre_hook(lambda m, inp: seen[m].append(inp[0].detach())) for m in layers]
    model.eval()
    for m in layers:
        m.train()
    with torch.no_grad():
        for x, _ in batches:
            model(x)
    for h in hooks:
        h.remove()
    model.eval()
    means = {m: torch.stack([x.mean(dim=(0, 2, 3)) for x in xs]).mean(0) for m, xs in seen.items()}
    vars_ = {m: torch.stack([x.var(dim=(0, 2, 3), unbiased=True) for x in xs]).mean(0) for m, xs in seen.items()}
    return means, vars_


def test_recalibrated_bn_statistics_equal_a_manual_pass_with_dropout_and_drop_path_off():
    model = tiny_model(drop_rate=0.5, drop_path_rate=0.5)
    dm = tiny_data(batch_size=16, augment=True)
    dm.set_data_config(model.data_config)
    dm.setup("fit")
    batches = list(dm.eval_dataloader("train"))  # 64 images, 4 batches
    assert len(batches) == 4
    expected_mean, expected_var = manual_bn_statistics(model, batches)
    frozen = W.bn_layers(model)[0]
    model.train()
    frozen.eval()  # a frozen group's BN layer, as lit-ft's freeze plans leave it
    modes = {name: m.training for name, m in model.named_modules()}
    momenta = {m: m.momentum for m in W.bn_layers(model)}

    assert W.recalibrate_bn(model, batches) == len(momenta)
    first = {m: (m.running_mean.clone(), m.running_var.clone()) for m in W.bn_layers(model)}
    W.recalibrate_bn(model, batches)  # drop-path/dropout off: a second pass gives the same statistics
    for m in W.bn_layers(model):
        assert torch.equal(m.running_mean, first[m][0]) and torch.equal(m.running_var, first[m][1])
        torch.testing.assert_close(m.running_mean, expected_mean[m], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(m.running_var, expected_var[m], rtol=1e-4, atol=1e-5)
        assert int(m.num_batches_tracked) == 4 and m.momentum == momenta[m]
    assert {name: m.training for name, m in model.named_modules()} == modes


def test_layers_named_in_keep_keep_their_statistics_and_the_rest_match_a_manual_pass():
    model = tiny_model()
    dm = tiny_data(batch_size=16)
    dm.set_data_config(model.data_config)
    dm.setup("fit")
    batches = list(dm.eval_dataloader("train"))
    names = list(W.named_bn_layers(model))
    keep = names[: len(names) // 2]
    with torch.no_grad():  # statistics unlike the data's, so a wrong reset would show
        for name in keep:
            W.named_bn_layers(model)[name].running_mean.fill_(0.3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    expected_mean, expected_var = manual_bn_statistics(model, batches, keep=keep)
    assert W.recalibrate_bn(model, batches, keep=keep) == len(names) - len(keep)
    layers = W.named_bn_layers(model)
    for name in keep:
        for stat in ("running_mean", "running_var", "num_batches_tracked"):
            assert torch.equal(model.state_dict()[f"{name}.{stat}"], before[f"{name}.{stat}"])
    for name in names[len(keep):]:
        torch.testing.assert_close(layers[name].running_mean, expected_mean[layers[name]], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(layers[name].running_var, expected_var[layers[name]], rtol=1e-4, atol=1e-5)


def test_a_soup_keeps_the_statistics_that_were_frozen_in_every_run_and_recomputes_the_rest(tmp_path, runs):
    from lit_ft.schedules import Surgical

    start = pretrained_file(runs["a"].parent)
    plan = lambda: Surgical(groups=["layer4"])  # noqa: E731  stem, layer1-3 and their BN frozen
    a = train_run(tmp_path, "s1", start, lr=0.05, seed=0, freeze=plan())
    b = train_run(tmp_path, "s2", start, lr=0.02, seed=1, freeze=plan())
    states = [torch.load(p, weights_only=True)["state_dict"] for p in (a, b)]
    soup = make_soup([a, b], tiny_data(), "uniform", bn_batches=2, accelerator="cpu")
    model = soup.model
    shared = W.shared_bn_statistics(model, states)
    assert shared and all(not n.startswith("model.layer4") for n in shared)
    assert any(n.startswith("model.layer4") for n in W.named_bn_layers(model))
    for name, layer in W.named_bn_layers(model).items():
        same = torch.equal(layer.running_var, states[0][f"{name}.running_var"])
        assert same == (name in shared), name  # frozen ones kept bit for bit, the others recomputed
    assert f"in {len(W.bn_layers(model)) - len(shared)} of {len(W.bn_layers(model))} BN layers" in soup.checkpoint["lit_ft"]["soup"]["bn"]


def test_the_eval_loader_serves_training_images_without_augmentation():
    dm = tiny_data(augment=True, train_size=64)
    dm.set_data_config(tiny_model().data_config)
    dm.setup("fit")
    first = torch.cat([x for x, _ in dm.eval_dataloader("train")])
    again = torch.cat([x for x, _ in dm.eval_dataloader("train")])
    assert torch.equal(first, again) and len(first) == 64
    val_transform = dm.val_dataset.transform
    source, index = dm.train_dataset.source, int(dm.train_dataset.indices[0])
    assert torch.equal(first[0], val_transform(source.image(index)))
    sample = torch.cat([x for x, _ in dm.eval_dataloader("train", limit=20)])
    assert len(sample) == 20 and all(any(torch.equal(s, f) for f in first) for s in sample)


def test_recalibration_leaves_the_statistics_alone_when_there_are_no_batches():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UserError, match="no batches"):
        W.recalibrate_bn(model, [])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# --------------------------------------------------------------------------- greedy soup


def test_the_greedy_soup_never_scores_below_its_best_ingredient_and_drops_a_bad_one(runs):
    dm = tiny_data()
    soup = make_soup([runs["bad"], runs["b"], runs["a"]], dm, "greedy", bn_batches=4, accelerator="cpu")
    alone = {r["checkpoint"]: r["val_acc"] for r in soup.rows[:-1]}
    first = soup.rows[0]
    assert first["val_acc"] == max(alone.values()) and first["in_soup"]
    assert soup.val_acc >= first["val_acc"]
    # the reported accuracy is the soup's, measured again from scratch
    assert evaluate(soup.model, tiny_data(), split="val", accelerator="cpu")["val/acc"] == pytest.approx(soup.val_acc)
    bad = next(r for r in soup.rows if r["checkpoint"] == str(runs["bad"]))
    assert bad["val_acc"] < 0.5 and not bad["in_soup"] and bad["soup_val_acc_with_it"] < soup.val_acc
    assert {i["path"] for i in soup.checkpoint["lit_ft"]["soup"]["rejected"]} == {str(runs["bad"])}


def test_the_soup_is_an_ordinary_checkpoint_for_test_and_load_from_checkpoint(runs, tmp_path):
    soup = make_soup([runs["a"], runs["b"]], tiny_data(), "uniform", bn_batches=4, accelerator="cpu")
    path = soup.save(tmp_path / "soup.ckpt")
    loaded = ImageClassifier.load_from_checkpoint(path, weights_only=True, pretrained=False)
    x = images()
    assert torch.equal(logits(loaded, x), logits(soup.model, x))
    assert loaded.class_names == [f"class_{i}" for i in range(4)]
    cli = main(["test", *TINY, "--ckpt_path", str(path), "--trainer.logger", "false"], return_cli=True)
    assert float(cli.trainer.callback_metrics["test/acc"]) == pytest.approx(
        evaluate(soup.model, tiny_data(), accelerator="cpu")["test/acc"])
    rows = list(csv.DictReader((tmp_path / "soup.csv").open()))
    assert [r["checkpoint"] for r in rows][-1] == "uniform soup (2)"
    assert "uniform soup of 2" in (tmp_path / "soup.md").read_text()


# --------------------------------------------------------------------------- compatibility


@pytest.mark.parametrize("other,problem", [
    ("vit", "backbone 'test_vit' vs 'test_resnet'"),
    ("other_start", "pretrained"),
])
def test_checkpoints_from_another_start_are_one_clear_error(runs, other, problem):
    with pytest.raises(UserError, match="cannot go into a soup with") as err:
        load_ingredients([runs["a"], runs[other]])
    assert problem in str(err.value) and str(runs[other]) in str(err.value)
    assert "same starting weights" in err.value.hint


def test_checkpoints_of_other_classes_are_one_clear_error(runs, tmp_path):
    other = train_run(tmp_path, "letters", pretrained_file(runs["a"].parent), epochs=1,
                      classes=["w", "x", "y", "z"])
    with pytest.raises(UserError, match=r"classes \[w, x, y, z\] \(4\) vs \[class_0"):
        load_ingredients([runs["a"], other])


def test_the_soup_command_explains_a_bad_mix_in_one_line(runs, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["soup", *TINY, "--ckpt", str(runs["a"]), str(runs["vit"])])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert "lit-ft: error:" in err and "backbone 'test_vit' vs 'test_resnet'" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        main(["soup", *TINY, "--ckpt_path", str(runs["a"]), "--ckpt", str(runs["b"])])
    assert "takes its checkpoints with --ckpt, not --ckpt_path" in capsys.readouterr().err


def test_the_soup_command_writes_checkpoint_and_table_from_a_glob(runs, tmp_path):
    for name in ("a", "b"):
        (tmp_path / "sweep" / name).mkdir(parents=True)
        shutil.copy(runs[name], tmp_path / "sweep" / name / "best.ckpt")
    assert len(expand_paths("sweep/*/best.ckpt")) == 2
    main(["soup", *TINY, "--ckpt", "sweep/*/best.ckpt", "--method", "greedy", "--bn_batches", "2", "--out", "out/soup.ckpt"])
    ckpt = torch.load("out/soup.ckpt", weights_only=True)
    assert ckpt["lit_ft"]["soup"]["method"] == "greedy" and "optimizer_states" not in ckpt
    assert Path("out/soup.md").is_file() and Path("out/soup.csv").is_file()
    with pytest.raises(UserError, match="no checkpoint matches nothing/"):
        expand_paths(["nothing/*.ckpt"])

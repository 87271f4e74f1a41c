"""WiSE-FT: the two ends are exact, the head policy is explicit, BatchNorm statistics are
recomputed in between, a is chosen on validation, and the command writes an ordinary checkpoint."""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning as L
import pytest
import torch

from lit_ft import ImageClassifier
from lit_ft import weight_space as W
from lit_ft.callbacks.lp_head import LinearProbeHead
from lit_ft.cli import main
from lit_ft.errors import UserError
from lit_ft.schedules import LPFT
from lit_ft.weights import classifier_keys
from lit_ft.wise import endpoints, pretrained_network, wise_ft
from tests.helpers import tiny_data
from tests.test_cli import TINY
from tests.tiny_runs import pretrained_file, train_run

pytestmark = pytest.mark.usefixtures("one_thread")


class HeadAfterEpoch(L.Callback):
    """Records the classifier after each training epoch (the LP head is the one after epoch 0)."""

    def __init__(self) -> None:
        self.heads = []

    def on_train_epoch_end(self, trainer, module) -> None:
        state = module.model.state_dict()
        self.heads.append({f"model.{k}": state[k].detach().clone() for k in classifier_keys(module.model)})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("wise_runs")
    start = pretrained_file(root)
    heads = HeadAfterEpoch()
    # An LP-FT run, watched: the head after its linear-probe epoch is what WiSE-FT must start from.
    L.seed_everything(0, verbose=False)
    model = ImageClassifier("test_resnet", pretrained=start, num_classes=4, class_names=[f"class_{i}" for i in range(4)],
                            freeze=LPFT(lp_epochs=1), optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9))
    from tests.helpers import trainer

    tr = trainer(root / "lpft", max_epochs=2, callbacks=[LinearProbeHead(), heads])
    tr.fit(model, datamodule=tiny_data())
    tr.save_checkpoint(root / "lpft.ckpt")
    return {
        "start": start,
        "lpft": root / "lpft.ckpt",
        "lp_heads": heads.heads,
        "full": train_run(root, "full", start, lr=0.05),
        "scratch": train_run(root, "scratch", False, epochs=1),
    }


def images(n=8):
    dm = tiny_data()
    dm.setup("test")
    return torch.stack([dm.test_dataset[i][0] for i in range(n)])


def test_a0_is_the_pretrained_backbone_and_a1_the_finetuned_model_exactly(runs):
    x = images()
    ckpt = W.read_checkpoint(runs["lpft"])
    at0 = wise_ft(runs["lpft"], tiny_data(), alphas=[0, 1], alpha=0, accelerator="cpu").model
    at1 = wise_ft(runs["lpft"], tiny_data(), alphas=[0, 1], alpha=1, accelerator="cpu").model
    pretrained = pretrained_network(ckpt).eval()
    finetuned = ImageClassifier.load_from_checkpoint(runs["lpft"], weights_only=True, pretrained=False).eval()
    with torch.no_grad():
        assert torch.equal(at0.eval().features(x), pretrained.forward_features(x))
        assert torch.equal(at1.eval()(x), finetuned(x))
        assert not torch.equal(at0.features(x), at1.features(x))


def test_the_a0_head_is_the_one_the_linear_probe_phase_ended_with(runs):
    ckpt = W.read_checkpoint(runs["lpft"])
    w0, w1, source = endpoints(ckpt, "auto")
    assert source == "linear-probe head"
    lp_head, final_head = runs["lp_heads"][0], runs["lp_heads"][-1]
    for k, v in lp_head.items():
        assert torch.equal(w0[k], v)
        assert torch.equal(w1[k], final_head[k]) and not torch.equal(v, final_head[k])
    # everything else at a = 0 is the pretrained network
    pre = pretrained_network(ckpt).state_dict()
    assert all(torch.equal(w0[f"model.{k}"], v) for k, v in pre.items() if f"model.{k}" not in lp_head)


def test_without_a_head_only_phase_auto_keeps_the_finetuned_head_and_says_so(runs):
    ckpt = W.read_checkpoint(runs["full"])
    with pytest.warns(UserWarning, match="no head from a head-only"):
        w0, w1, source = endpoints(ckpt, "auto", str(runs["full"]))
    assert source == "fine-tuned head"
    head = [k for k in w1 if "fc." in k]
    assert head and all(torch.equal(w0[k], w1[k]) for k in head)
    with pytest.raises(UserError, match="has no head from a head-only"):
        endpoints(ckpt, "lp", str(runs["full"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an explicit choice: no warning
        endpoints(ckpt, "finetuned")


def test_a_run_from_random_weights_has_no_pretrained_end(runs):
    with pytest.raises(UserError, match="trained from random weights"):
        wise_ft(runs["scratch"], tiny_data(), accelerator="cpu")


def test_between_the_ends_bn_statistics_are_recomputed_or_interpolated(runs):
    ckpt = W.read_checkpoint(runs["lpft"])
    w0, w1, _ = endpoints(ckpt)
    mid = W.interpolate(w0, w1, 0.5)
    kept = wise_ft(runs["lpft"], tiny_data(), alphas=[0.5], bn_batches=0, accelerator="cpu")
    key = next(k for k in mid if k.endswith("running_var"))
    assert torch.equal(kept.model.state_dict()[key], mid[key])
    torch.testing.assert_close(mid[key], (w0[key] + w1[key]) / 2)

    recal = wise_ft(runs["lpft"], tiny_data(), alphas=[0.5], bn_batches=1, accelerator="cpu")
    manual = ImageClassifier.load_from_checkpoint(runs["lpft"], weights_only=True, pretrained=False)
    manual.load_state_dict(mid)
    dm = tiny_data()
    dm.set_data_config(manual.data_config)
    dm.setup("fit")
    W.recalibrate_bn(manual, dm.eval_dataloader("train", limit=dm.eval_batch_size))
    for k, v in manual.state_dict().items():
        assert torch.equal(recal.model.state_dict()[k], v), k
    assert not torch.equal(recal.model.state_dict()[key], mid[key])
    assert "recomputed on 16 training images" in recal.checkpoint["lit_ft"]["wise"]["bn"]


def test_a_is_chosen_on_validation_ties_to_the_smaller_or_by_a_rule(runs):
    result = wise_ft(runs["lpft"], tiny_data(), alphas=[0, 0.5, 1], accelerator="cpu")
    best = max(r["val_acc"] for r in result.rows)
    assert result.alpha == min(r["a"] for r in result.rows if r["val_acc"] == best)
    assert [r["a"] for r in result.rows if r["chosen"]] == [result.alpha]
    assert wise_ft(runs["lpft"], tiny_data(), alphas=[0, 1], tolerance=1.0, accelerator="cpu").alpha == 0
    given = wise_ft(runs["lpft"], tiny_data(), alphas=[0, 1], alpha=0.3, accelerator="cpu")
    assert given.alpha == 0.3 and [r["a"] for r in given.rows] == [0, 0.3, 1]
    with pytest.raises(UserError, match=r"every a must be in \[0, 1\]"):
        wise_ft(runs["lpft"], tiny_data(), alphas=[0, 1.5], accelerator="cpu")


def test_the_wise_command_writes_a_checkpoint_a_table_and_tensorboard_curves(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    main(["wise", *TINY, "--ckpt_path", str(runs["lpft"]), "--alphas", "[0, 0.5, 1]", "--corruptions", "[contrast]",
          "--severities", "[3]", "--shift_subset", "16", "--bn_batches", "2", "--out", "w/wise.ckpt"])
    ckpt = torch.load("w/wise.ckpt", weights_only=True)
    info = ckpt["lit_ft"]["wise"]
    assert info["head"] == "linear-probe head" and [r["a"] for r in info["grid"]] == [0, 0.5, 1]
    assert all(0 <= r["mean_corruption_acc"] <= 1 for r in info["grid"])
    table = Path("w/wise.md").read_text()
    assert "mean_corruption_acc" in table and table.count("\n| ") == 4  # header + 3 rows
    acc = EventAccumulator(str(next(Path("runs").rglob("events.out.tfevents.*")).parent))
    acc.Reload()
    assert [e.step for e in acc.Scalars("wise/val_acc")] == [0, 50, 100]
    cli = main(["test", *TINY, "--ckpt_path", "w/wise.ckpt", "--trainer.logger", "false"], return_cli=True)
    assert "test/acc" in cli.trainer.callback_metrics


def test_the_saved_lp_head_survives_a_resume_after_the_probe_phase(runs, tmp_path):
    from tests.helpers import StopAfter, trainer

    def run(stop=None, resume=None):
        L.seed_everything(0, verbose=False)
        model = ImageClassifier("test_resnet", pretrained=runs["start"], num_classes=4, class_names=[f"class_{i}" for i in range(4)],
                                freeze=LPFT(lp_epochs=1), optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9))
        tr = trainer(tmp_path, max_epochs=2, callbacks=[LinearProbeHead()] + ([StopAfter(stop)] if stop else []))
        tr.fit(model, datamodule=tiny_data(), ckpt_path=resume)
        path = tmp_path / f"{'stopped' if stop else 'resumed' if resume else 'whole'}.ckpt"
        tr.save_checkpoint(path)
        return path

    whole = LinearProbeHead.from_checkpoint(torch.load(run(), weights_only=True))
    resumed = LinearProbeHead.from_checkpoint(torch.load(run(resume=run(stop=1)), weights_only=True))
    assert whole is not None and resumed is not None and whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)

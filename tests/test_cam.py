"""Grad-CAM: the maps point at the object, the pass is safe in Lightning's loops and with a
frozen backbone, ViT tokens land on the right grid cells, nothing leaks over epochs, DDP logs
from rank zero, and predict writes overlays and top-k probabilities."""

from __future__ import annotations

import csv
import gc
import io
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lit_ft import ImageClassifier
from lit_ft.callbacks import GradCAMLogger
from lit_ft.callbacks.cam import overlay_name
from lit_ft.cam import _reshape, compute_cams, default_target_layer, resolve_layer
from lit_ft.cli import main
from lit_ft.errors import UserError
from lit_ft.schedules import LinearProbe
from lit_ft.show import show_cam
from tests.helpers import snapshot, tiny_data, tiny_model, trainer
from tests.test_cli import TINY

ROOT = Path(__file__).resolve().parents[1]
SIZE, SQUARE = 48, 10


def _squares(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noise images; class 1 has a bright SQUARE x SQUARE square at a random position, class 0 none."""
    x = torch.randn(n, 3, SIZE, SIZE, generator=g) * 0.5
    y = torch.randint(0, 2, (n,), generator=g)
    corner = torch.randint(0, SIZE - SQUARE, (n, 2), generator=g)
    for i in np.flatnonzero(y.numpy()):
        r, c = corner[i].tolist()
        x[i, :, r : r + SQUARE, c : c + SQUARE] += 2.0
    return x, y, corner


def test_gradcam_of_a_model_trained_to_find_a_bright_square_peaks_inside_the_square(one_thread):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x, y, _ = _squares(512, g)
    model = ImageClassifier("test_resnet", num_classes=2, head_init="normal")
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    model.train()
    for _ in range(2):
        for idx in torch.randperm(512, generator=g).split(32):
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    xt, yt, corner = _squares(160, g)
    xt, corner = xt[yt == 1][:48], corner[yt == 1][:48]
    # layer2 (stride 8): a 6x6 map at 48 px; the final 2x2 map cannot localise a 10 px square
    cams, _ = compute_cams(model.eval(), xt, [1] * len(xt), target_layer="layer2")
    assert cams.shape == (len(xt), SIZE, SIZE)
    peaks = [np.unravel_index(c.argmax(), c.shape) for c in cams]
    inside = [r - 2 <= pr < r + SQUARE + 2 and c - 2 <= pc < c + SQUARE + 2 for (pr, pc), (r, c) in zip(peaks, corner.tolist())]
    # a peak at a random position would land there for ~(14/48)^2 = 9% of the images
    assert np.mean(inside) >= 0.75, f"{sum(inside)}/{len(inside)} peaks inside the square"


def test_cam_pass_in_inference_mode_with_a_frozen_backbone_leaves_flags_grads_and_modes_as_it_found_them():
    model = tiny_model(head_init="normal")
    for p in model.model.parameters():
        p.requires_grad_(False)
    head = model.model.get_classifier()
    head.weight.requires_grad_(True)
    model.train()
    model.model.layer1.eval()  # e.g. a frozen group's BN kept in eval by the plan
    model(torch.randn(2, 3, 32, 32)).sum().backward()  # a training step's accumulated gradient
    grad = head.weight.grad.clone()
    flags = [p.requires_grad for p in model.parameters()]
    modes = [m.training for m in model.modules()]
    before = snapshot(model)
    with torch.inference_mode():  # as in Lightning's validation and predict loops
        images = torch.randn(4, 3, 32, 32)
        cams, logits = compute_cams(model, images, target_layer="layer3")
    assert cams.shape == (4, 32, 32) and logits.shape == (4, 4)
    assert np.isfinite(cams).all() and cams.max() > 0.99  # scaled per image: a real map, not all zero
    assert torch.equal(head.weight.grad, grad)  # grad-cam's zero_grad did not wipe it, nothing was added
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("model.fc"))
    assert [p.requires_grad for p in model.parameters()] == flags
    assert [m.training for m in model.modules()] == modes
    assert all(torch.equal(v, before[k]) for k, v in snapshot(model).items())  # BN statistics untouched


def test_vit_default_target_is_the_last_blocks_norm1_and_tokens_map_to_their_grid_cells():
    model = tiny_model("test_vit", head_init="normal")
    assert default_target_layer(model.model) == "blocks.-1.norm1"
    assert resolve_layer(model.model, "blocks.-1.norm1") is model.model.blocks[-1].norm1
    # 64 px, patch 16: 1 class token + a 4x4 grid; token 1 + 4*i + j must land in cell (i, j)
    tokens = torch.zeros(1, 17, 3)
    tokens[0, 1:, 0] = torch.arange(16, dtype=torch.float)
    tokens[0, 0] = 99.0  # the class token must be dropped
    grid = _reshape(model.model, (64, 64))(tokens)
    assert grid.shape == (1, 3, 4, 4)
    assert torch.equal(grid[0, 0], torch.arange(16, dtype=torch.float).view(4, 4))
    assert (grid != 99.0).all()
    cams, _ = compute_cams(model, torch.randn(2, 3, 64, 64))
    assert cams.shape == (2, 64, 64) and np.isfinite(cams).all() and cams.max() > 0.99


def test_a_wrong_target_layer_names_the_layers_there_are():
    model = tiny_model()
    with pytest.raises(UserError) as err:
        resolve_layer(model.model, "layer9")
    assert "has no 'layer9'" in str(err.value) and "layer4" in str(err.value)


def test_cli_refuses_a_wrong_target_layer_before_training(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["fit", *TINY, "--trainer.max_epochs", "1", "--cam.target_layer", "layer3.nope"])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert "CAM target layer 'layer3.nope'" in err and "HINT" in err
    assert not list(Path("runs").glob("*/*/checkpoints/*.ckpt"))  # stopped before any epoch


def _live_tensors() -> int:
    return sum(issubclass(type(o), torch.Tensor) for o in gc.get_objects())


class _Probe(L.Callback):
    """After each validation (so after the CAM pass): live tensors and Python-heap bytes."""

    def __init__(self) -> None:
        self.tensors: list[int] = []
        self.heap: list[int] = []

    def on_validation_end(self, trainer, pl_module) -> None:
        gc.collect()
        self.tensors.append(_live_tensors())
        if not tracemalloc.is_tracing():  # from the end of the first (warm-up) epoch on: imports, font caches
            tracemalloc.start()
        self.heap.append(tracemalloc.get_traced_memory()[0])


def _cam_trainer(root: Path, callbacks: list, epochs: int, **kw) -> L.Trainer:
    kw = {"limit_train_batches": 2, **kw}
    return trainer(root, max_epochs=epochs, logger=TensorBoardLogger(str(root), name="cam"), callbacks=callbacks, **kw)


def test_cam_panels_with_a_fully_frozen_backbone_inside_validation_and_frozen_weights_stay_bit_identical(tmp_path, one_thread):
    model = tiny_model(freeze=LinearProbe(), head_init="normal")
    before = snapshot(model)
    cam = GradCAMLogger(every_n_epochs=1, num_images=4, target_layer="layer3")
    tr = _cam_trainer(tmp_path, [cam], epochs=2)
    tr.fit(model, tiny_data())
    acc = EventAccumulator(tr.log_dir, size_guidance={"images": 0})
    acc.Reload()
    panels = acc.Images("val/gradcam")
    assert len(panels) == 2
    img = np.asarray(Image.open(io.BytesIO(panels[-1].encoded_image_string)))
    assert img.ndim == 3 and img.std() > 10
    after = snapshot(model)
    frozen = [k for k in before if k.startswith("model.") and not k.startswith("model.fc")]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)  # the CAM trained nothing
    assert not torch.equal(before["model.fc.weight"], after["model.fc.weight"])  # the head did train
    assert not any(p.requires_grad for n, p in model.named_parameters() if n in frozen)


@pytest.mark.slow
def test_five_cam_epochs_do_not_grow_memory(tmp_path, one_thread):
    probe = _Probe()
    cam = GradCAMLogger(every_n_epochs=1, num_images=8, target_layer="layer3")
    try:
        _cam_trainer(tmp_path, [cam, probe], epochs=6, limit_train_batches=1, limit_val_batches=1).fit(
            tiny_model(head_init="normal"), tiny_data())
    finally:
        tracemalloc.stop()
    # epoch 0 warms caches; epochs 1..5 are five more CAM passes with hooks and activations
    assert probe.tensors[1:] == [probe.tensors[1]] * 5, probe.tensors
    # Python heap (numpy maps, figures, hooks' closures) from the end of epoch 1: measured ~17 KB over
    # four epochs (Lightning's own bookkeeping); one leaked panel figure or map batch per epoch is far more
    assert max(probe.heap[1:]) - probe.heap[1] < 128 * 1024, probe.heap


def test_leaked_cam_hooks_would_be_caught_by_that_probe(tmp_path):
    # The control: grad-cam objects whose hooks are never released keep every activation of
    # every later forward pass (pytorch-grad-cam #132); the same probe sees the tensors pile up.
    import pytorch_grad_cam

    model = tiny_model(head_init="normal").eval()
    counts, kept = [], []
    for _ in range(3):
        kept.append(pytorch_grad_cam.GradCAM(model=model, target_layers=[model.model.layer3]))  # no `with`, kept alive
        kept[-1](input_tensor=torch.randn(2, 3, 32, 32), targets=None)
        model(torch.randn(2, 3, 32, 32))  # every live, unreleased CAM object stores this pass's activations too
        gc.collect()
        counts.append(_live_tensors())
    assert counts[2] > counts[1] > counts[0]
    for cam in kept:
        cam.activations_and_grads.release()


def test_show_cam_from_a_datamodule_and_from_tensors(one_thread):
    model, dm = tiny_model(head_init="normal"), tiny_data()
    fig = show_cam(model, dm, n=4, target_layer="layer3")
    assert len([ax for ax in fig.axes if ax.images]) == 4
    first_label = int(next(iter(dm.val_dataloader()))[1][0])
    assert fig.axes[0].get_title().endswith(f"\ntrue: {first_label}")  # the split's first image, with its label
    fig = show_cam(model, torch.randn(3, 3, 32, 32), target_layer="layer3")
    assert len([ax for ax in fig.axes if ax.images]) == 3


def test_overlay_names_keep_folders_and_never_leave_the_output_folder():
    assert overlay_name("sub/cat.jpg") == "sub/cat.jpg.png"
    assert overlay_name("dog.png") == "dog.png"
    assert overlay_name(torch.tensor(7)) == "000007.png"
    assert overlay_name("../../etc/x.jpg") == "etc/x.jpg.png"
    assert overlay_name("/abs/y.png") == "abs/y.png"


@pytest.mark.slow
def test_predict_writes_top_k_calibrated_probabilities_and_one_cam_overlay_per_image(tmp_path):
    cli = main(["fit", *TINY, "--trainer.max_epochs", "1", "--cam.every_n_epochs", "0"], return_cli=True)
    ckpt = Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt"
    folder = tmp_path / "imgs" / "sub"
    folder.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (40, 40), (60 * i, 30, 200)).save(folder / f"{i}.jpg")
    main(["predict", "--data", "lit_ft.data.ImageFolderDataModule", "--data.predict_dir", str(tmp_path / "imgs"),
          "--data.image_size", "32", "--ckpt_path", str(ckpt), "--prediction_writer.output", str(tmp_path / "p.csv"),
          "--prediction_writer.top_k", "3", "--cam.predict_dir", str(tmp_path / "cams"), "--trainer.enable_progress_bar", "false"])
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert list(rows[0]) == ["id", "class", "index", "prob", "class_2", "prob_2", "class_3", "prob_3"]
    for r in rows:
        probs = [float(r["prob"]), float(r["prob_2"]), float(r["prob_3"])]
        assert probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-5
        assert len({r["class"], r["class_2"], r["class_3"]}) == 3
    for i in range(3):
        pic = np.asarray(Image.open(tmp_path / "cams" / "sub" / f"{i}.jpg.png"))
        assert pic.shape == (32, 32, 3) and pic.std() > 1  # the model input with a heat map over it


@pytest.mark.slow
def test_ddp_cam_panels_come_from_rank_zero_only(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MASTER_PORT": str(31500 + os.getpid() % 1000)}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "ddp_cam_run.py"), str(tmp_path)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [p.parent for p in tmp_path.glob("**/events.out.tfevents.*")]
    assert len(set(runs)) == 1  # one writer: rank zero's
    acc = EventAccumulator(str(runs[0]), size_guidance={"images": 0})
    acc.Reload()
    assert len(acc.Images("val/gradcam")) == 2  # one panel per epoch, from rank zero
    assert sorted(p.name for p in tmp_path.glob("rank*.done")) == ["rank0.done", "rank1.done"]  # no rank hung

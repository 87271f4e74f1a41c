"""Can I trust the quickstart model? Calibration, per-class errors and Grad-CAM, into docs/.

    python benchmarks/calibration_report.py --ckpt runs/quickstart/version_0           # best checkpoint of a run
    python benchmarks/calibration_report.py --ckpt path/to/best.ckpt --target_layer blocks.4

From one trained checkpoint and the data of its run (rebuilt from the run's ``config.yaml``):

* fits a temperature on the validation logits (the same :func:`lit_ft.calibration.fit_temperature`
  as ``lit-ft calibrate``; the checkpoint is not modified) and reports test NLL and ECE
  before/after, next to Guo et al. 2017's ImageNet figures;
* the test split's per-class precision/recall/F1/support and its most confused pairs;
* ``docs/calibration_reliability.png``: test reliability diagrams before/after;
* ``docs/cam_panel.png``: Grad-CAM overlays of 8 right and 8 wrong test predictions.

and writes (replaces) the section ``## Can I trust it? ...`` of ``docs/results.md``. Inference
runs in eval mode under ``torch.inference_mode`` on the CPU (or ``--device``); for the
quickstart (2,000 validation + 10,000 test images at 64 px) that is a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import machine, table  # noqa: E402
from lit_ft.calibration import calibration_numbers, fit_temperature, reliability_bins, reliability_figure  # noqa: E402
from lit_ft.callbacks.class_report import format_pairs, most_confused, per_class_stats  # noqa: E402
from lit_ft.callbacks.figures import figure_to_array, input_stats, unnormalize  # noqa: E402
from lit_ft.cam import FEATURES, cam_panel, compute_cams, default_target_layer, is_token_model  # noqa: E402
from lit_ft.experiment import find_checkpoint, load_run, run_datamodule  # noqa: E402

SECTION = "Can I trust it? Calibration, per-class errors and Grad-CAM (quickstart model)"
# Guo et al. 2017, table 1 (ECE, 15 bins, before -> after temperature scaling).
GUO = "ImageNet ResNet-152 5.48% -> 1.86%, DenseNet-161 6.28% -> 1.99% (Guo et al. 2017, table 1)"


def logits_of(model, loader, device: str, limit: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Uncalibrated logits (the model's forward; its temperature is not applied), labels, and
    the first 256 inputs (for the CAM panel) of a loader."""
    chunks, labels, kept, seen = [], [], [], 0
    with torch.inference_mode():
        for x, y in loader:
            chunks.append(model(x.to(device)).float().cpu())
            labels.append(y)
            if seen < 256:
                kept.append(x[: 256 - seen])
            seen += len(x)
            if limit and seen >= limit:
                break
    return torch.cat(chunks), torch.cat(labels), torch.cat(kept)


def auto_target_layer(model) -> str:
    """The deepest timm feature stage whose map is still >= 4x4 at the model's input size (the
    final map of a CNN at 64 px is 2x2, too coarse to show where it looks); the family default
    for ViTs and when the final map is big enough."""
    backbone = model.model
    if is_token_model(backbone):
        return default_target_layer(backbone)
    size = int(model.data_config["input_size"][-1])
    stages = [(f["module"], f["reduction"]) for f in getattr(backbone, "feature_info", [])]
    if not stages or size // stages[-1][1] >= 4:
        return FEATURES
    fine = [name for name, reduction in stages if size // reduction >= 4]
    return fine[-1] if fine else FEATURES


def side_by_side(left: Figure, right: Figure, path: Path) -> None:
    a, b = figure_to_array(left), figure_to_array(right)
    h = max(a.shape[0], b.shape[0])
    pad = lambda img: np.pad(img, ((0, h - img.shape[0]), (0, 0), (0, 0)), constant_values=255)  # noqa: E731
    fig = Figure(figsize=((a.shape[1] + b.shape[1]) / 100, h / 100), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(np.concatenate([pad(a), pad(b)], axis=1))
    ax.axis("off")
    fig.savefig(path)


def write_section(results: Path, body: str, command: str) -> None:
    """Replace (or append) this script's section of ``results``."""
    text = results.read_text() if results.exists() else "# lit-ft results\n"
    section = f"## {SECTION}\n\nCommand: `{command}` ({time.strftime('%Y-%m-%d')})\n\nMachine: {machine()}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: section + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    results.write_text(text)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="a .ckpt file or a run directory (its best checkpoint)")
    p.add_argument("--target_layer", default=None, help="CAM target layer (default: auto, see auto_target_layer)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--results", default=str(ROOT / "docs" / "results.md"))
    p.add_argument("--images_dir", default=str(ROOT / "docs"))
    p.add_argument("--limit", type=int, default=0, help="at most this many images per split (smoke tests)")
    args = p.parse_args(argv)
    command = "python benchmarks/calibration_report.py " + " ".join(argv if argv is not None else sys.argv[1:])

    started = time.perf_counter()
    ckpt = find_checkpoint(args.ckpt, "best")
    model = load_run(ckpt).to(args.device)
    dm = run_datamodule(ckpt)
    dm.set_data_config(model.data_config)  # the checkpoint's trained preprocessing
    dm.setup("validate")
    dm.setup("test")
    names = model.class_names
    val_z, val_y, _ = logits_of(model, dm.val_dataloader(), args.device, args.limit)
    test_z, test_y, test_x = logits_of(model, dm.test_dataloader(), args.device, args.limit)
    t = fit_temperature(val_z, val_y)
    rows = [calibration_numbers("validation", val_z, val_y, t), calibration_numbers("test", test_z, test_y, t)]

    # per class on test (the argmax is the same at any temperature)
    pred = test_z.argmax(-1)
    cm = torch.bincount(test_y * len(names) + pred, minlength=len(names) ** 2).view(len(names), len(names)).numpy()
    stats = per_class_stats(cm)
    pairs = most_confused(cm, 5)

    images = Path(args.images_dir).resolve()
    images.mkdir(parents=True, exist_ok=True)
    side_by_side(reliability_figure(reliability_bins(test_z.softmax(-1), test_y), "test, before (T=1)"),
                 reliability_figure(reliability_bins((test_z / t).softmax(-1), test_y), f"test, after (T={t:.2f})"),
                 images / "calibration_reliability.png")

    # CAM panel: the first 8 right and the first 8 wrong of the first 256 test images
    layer = args.target_layer or auto_target_layer(model)
    shown = test_x.shape[0]
    right = torch.nonzero(pred[:shown] == test_y[:shown]).flatten()[:8]
    wrong = torch.nonzero(pred[:shown] != test_y[:shown]).flatten()[:8]
    idx = torch.cat([right, wrong])
    cams, logits = compute_cams(model, test_x[idx].to(args.device), target_layer=layer)
    mean, std = input_stats(dm, model)
    fig = cam_panel(unnormalize(test_x[idx], mean, std), cams, (logits.cpu() / t).softmax(-1), names,
                    test_y[idx].tolist(), suptitle=f"Grad-CAM ({layer}) of the predicted class: "
                    f"{len(right)} right (green), {len(wrong)} wrong (red) test images; calibrated probabilities")
    fig.savefig(images / "cam_panel.png")

    val, test = rows
    rel = Path(os.path.relpath(images, Path(args.results).resolve().parent))  # image links relative to the results file
    body = [
        f"Checkpoint `{ckpt}` ({model.hparams.backbone}, {len(names)} classes); temperature fitted on the "
        f"{val.images:,} validation images by LBFGS on the NLL (what `lit-ft calibrate` does): **T = {t:.3f}**. "
        "Accuracy is unchanged by construction (T > 0 keeps the argmax).",
        "",
        table(["split", "images", "accuracy", "NLL before", "NLL after", "ECE before", "ECE after"],
              [[r.split, f"{r.images:,}", f"{r.accuracy:.2%}", f"{r.nll_before:.4f}", f"{r.nll_after:.4f}",
                f"{r.ece_before:.2%}", f"{r.ece_after:.2%}"] for r in rows]),
        "",
        f"ECE: 15 equal-width confidence bins (torchmetrics `MulticlassCalibrationError`). For scale: {GUO}. "
        + ("T > 1: the model was over-confident, its probabilities are softened."
           if t > 1 else "T < 1: the model was under-confident (label smoothing, used by the quickstart, "
           "pulls confidences down), its probabilities are sharpened."),
        "",
        f"![test reliability before and after temperature scaling]({rel / 'calibration_reliability.png'})",
        "",
        f"Per class on the {test.images:,} test images:",
        "",
        table(["class", "precision", "recall", "F1", "support"],
              [[names[i], f"{stats.precision[i]:.3f}", f"{stats.recall[i]:.3f}", f"{stats.f1[i]:.3f}", f"{stats.support[i]:,}"]
               for i in range(len(names))]),
        "",
        f"Most confused (true -> predicted, share of the true class): {format_pairs(pairs, names)}.",
        "",
        f"Grad-CAM of `{layer}`" + (f" (at {int(model.data_config['input_size'][-1])} px the final feature map is too "
        "coarse to localise, so the report explains the deepest stage with a map of at least 4x4)"
        if layer != FEATURES and not args.target_layer else "") + ":",
        "",
        f"![Grad-CAM panel]({rel / 'cam_panel.png'})",
        "",
        f"Report time: {time.perf_counter() - started:.0f} s.",
    ]
    write_section(Path(args.results), "\n".join(body), command)
    print("\n".join(body))


if __name__ == "__main__":
    main()

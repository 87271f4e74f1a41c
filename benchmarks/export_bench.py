"""PyTorch fp32 vs ONNX Runtime fp32 vs ONNX Runtime int8 on the CPU, for a trained checkpoint.

    python -m benchmarks.export_bench --ckpt runs/quickstart/version_0/checkpoints/best-....ckpt

Runs ``lit-ft export --format onnx --int8 true`` on the checkpoint (with the run's saved
``config.yaml`` beside its ``checkpoints/`` folder, or ``--config``), which verifies both ONNX
files and times the three models side by side (median of ``--rounds`` rounds, batch 1 and 32,
as many threads as torch uses). Then it classifies the whole test split (Fashion-MNIST: the
10,000 test images) with each of the three, using the preprocessing stored in the export's
``config.json``, and reports test accuracy, top-1 agreement with PyTorch, size on disk and
latency in BENCHMARKS.md. The int8 refusal thresholds are lifted (``--int8_min_agreement 0
--int8_max_accuracy_drop 1``) so a miss is measured and reported rather than refused.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from benchmarks.report import command, table, write_section
from lit_ft import export as E
from lit_ft.cli import main as lit_ft_main
from lit_ft.data.transforms import ImageTransform

SECTION = "Export: PyTorch fp32 vs ONNX Runtime fp32 vs int8 (CPU)"
NAMES = ("PyTorch fp32", "ONNX Runtime fp32", "ONNX Runtime int8")


def run_config(ckpt: Path, given: str | None) -> str:
    """The run's own config.yaml (``runs/<exp>/version_N/config.yaml``) unless one is given."""
    if given:
        return given
    saved = ckpt.parent.parent / "config.yaml"
    if not saved.is_file():
        sys.exit(f"no config.yaml next to {ckpt.parent}; pass the run's config with --config")
    return str(saved)


def evaluate(runners: dict, loader: DataLoader) -> tuple[dict[str, float], dict[str, float], float, int]:
    """Accuracy of each runner, its top-1 agreement with the first (PyTorch), the max |logit
    difference| of ONNX fp32 vs PyTorch, and the number of images."""
    correct = {n: 0 for n in runners}
    agree = {n: 0 for n in runners}
    max_diff, seen = 0.0, 0
    for x, y in loader:
        logits = {n: run(x) for n, run in runners.items()}
        ref = logits[NAMES[0]]
        for n, out in logits.items():
            correct[n] += int((out.argmax(-1) == y).sum())
            agree[n] += int((out.argmax(-1) == ref.argmax(-1)).sum())
        max_diff = max(max_diff, float((logits[NAMES[1]] - ref).abs().max()))
        seen += len(y)
    return {n: c / seen for n, c in correct.items()}, {n: a / seen for n, a in agree.items()}, max_diff, seen


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="the trained lit-ft checkpoint")
    p.add_argument("--config", help="the run's config (default: config.yaml of the checkpoint's run)")
    p.add_argument("--rounds", type=int, default=5, help="rounds of side-by-side latency timing")
    p.add_argument("--limit", type=int, default=None, help="evaluate only this many test images (smoke runs)")
    p.add_argument("--dry-run", action="store_true", help="print the section, do not write BENCHMARKS.md")
    args = p.parse_args()
    ckpt = Path(args.ckpt)
    config = run_config(ckpt, args.config)

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "export"
        cli = lit_ft_main([
            "export", "--config", config, "--ckpt_path", str(ckpt), "--format", "onnx", "--int8", "true",
            "--out", str(out), "--int8_min_agreement", "0", "--int8_max_accuracy_drop", "1", "--latency_runs", str(args.rounds),
            "--trainer.logger", "false",
        ], return_cli=True)
        report = json.loads((out / E.REPORT_FILE).read_text())
        exported = json.loads((out / E.CONFIG_FILE).read_text())
        model = cli.model.eval()
        transform = ImageTransform(exported["pretrained_cfg"], None, exported["lit_ft"]["grayscale_to_rgb"])
        cli.datamodule.setup("test")
        test = E.split_dataset(cli.datamodule, "test", transform)
        if test is None:
            sys.exit("the run's data has no test split")
        if args.limit:
            test = torch.utils.data.Subset(test, range(min(args.limit, len(test))))
        loader = DataLoader(test, batch_size=256, shuffle=False, num_workers=0)
        runners = {
            NAMES[0]: E.torch_runner(model),
            NAMES[1]: E.load_artefact(out / E.ARTEFACT["onnx"]),
            NAMES[2]: E.load_artefact(out / E.INT8_ARTEFACT),
        }
        acc, agree, max_diff, n = evaluate(runners, loader)

    latency = {name: {int(b): ms for b, ms in v.items()} for name, v in report["latency_ms"].items()}
    sizes = report["sizes"]
    base1 = latency[NAMES[0]][1]
    rows = [
        [name, f"{100 * acc[name]:.2f}%", "-" if name == NAMES[0] else f"{100 * agree[name]:.2f}%",
         f"{sizes[name] / 1e6:.2f} MB", f"{latency[name][1]:.2f}", f"{latency[name][32]:.1f}",
         f"{base1 / latency[name][1]:.2f}x"]
        for name in NAMES
    ]
    backbone = cli.model.hparams.get("backbone")
    size = exported["pretrained_cfg"]["input_size"][-1]
    change = 100 * (acc[NAMES[2]] - acc[NAMES[0]])  # int8 accuracy minus PyTorch's, in points
    speedup = base1 / latency[NAMES[2]][1]
    verdicts = [
        f"ONNX fp32 agreement {100 * agree[NAMES[1]]:.2f}% (target >= 99.9%: {'met' if agree[NAMES[1]] >= 0.999 else 'MISSED'}), "
        f"max abs logit diff {max_diff:.2e}.",
        f"int8 vs PyTorch fp32 at batch 1: {speedup:.2f}x faster, accuracy {change:+.2f} points "
        f"(target >= 2x faster and <= 1 point lost: {'met' if speedup >= 2 and change >= -1 else 'MISSED'}).",
    ]
    body = (
        f"{backbone}, {size} px, checkpoint `{ckpt}`; test accuracy on {n:,} test images with the preprocessing stored "
        f"in the export's config.json. Exporter: {report['exporter']}, opset {report['opset']}. int8: {report['quantization']}. Latency: median ms "
        f"per call over {args.rounds} interleaved rounds (PyTorch in eval/inference mode as `lit-ft predict` runs it; "
        f"ONNX Runtime CPU provider with the same thread count); PyTorch size is its fp32 weight tensors.\n\n"
        + table(["model", "test acc", "top-1 agreement with PyTorch", "size", "batch 1 ms", "batch 32 ms",
                 "batch 1 speed-up"], rows)
        + "\n\n" + " ".join(verdicts)
    )
    if args.dry_run:
        print(body)
    else:
        write_section(SECTION, body, command())


if __name__ == "__main__":
    main()

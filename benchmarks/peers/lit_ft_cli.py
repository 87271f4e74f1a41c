"""lit-ft, as a new user runs it: the real ``lit-ft fit`` command on a recipe from the README.

Owns: the command line for a run. The recipe is the README's for the setting: all 58,000 images
-> ``configs/experiments/cpu_best.yaml`` (the README's full-data CPU recipe: 2 DDP processes,
layer decay 0.7, stem and blocks.0-1 frozen); 10% of the labels -> ``configs/quickstart.yaml``
(what ``make run`` trains). The overrides are only what the benchmark sets for every peer (the
subset, epochs, seed, where the run is written) plus the measuring probe as an extra callback
(``--trainer.callbacks+``, as the README adds callbacks). ``test_after_fit`` is off because the
probe tests the final weights itself (lit-ft's own test would repeat it, outside the clock anyway).
"""

from __future__ import annotations

import sys
from pathlib import Path

from benchmarks.peers.probe import LightningProbe

ROOT = Path(__file__).resolve().parents[2]
EXPERIMENTS = ROOT / "configs" / "experiments"
# Each recipe as the README runs it: the strategy configs compose onto _base.yaml.
RECIPES = {"full": [EXPERIMENTS / "_base.yaml", EXPERIMENTS / "cpu_best.yaml"], "10pct": [ROOT / "configs" / "quickstart.yaml"]}
PROBE = f"{LightningProbe.__module__}.{LightningProbe.__qualname__}"


def command(spec: dict, run_dir: Path, smoke: bool = False) -> list[str]:
    """``python -m lit_ft fit --config <recipe> ...`` for ``spec`` (``python -m lit_ft`` is the
    ``lit-ft`` command, README "Using it"), logging to ``run_dir``."""
    data = spec["data"]
    cmd = [
        sys.executable, "-m", "lit_ft", "fit", *(a for c in RECIPES[spec["setting"]] for a in ("--config", str(c))),
        "--data.init_args.train_subset", str(data["train_subset"]),
        "--data.init_args.seed", str(data["seed"]), "--seed_everything", str(data["seed"]),
        "--trainer.max_epochs", str(spec["epochs"]),
        "--trainer.logger.init_args.save_dir", str(run_dir.parent.parent),
        "--trainer.logger.init_args.name", run_dir.parent.name, "--trainer.logger.init_args.version", run_dir.name,
        "--trainer.enable_progress_bar", "false", "--test_after_fit", "false",
        "--trainer.callbacks+", PROBE,
    ]
    if smoke:  # a few hundred images: a smaller hold-out and validation batch than the recipe's
        cmd += ["--data.init_args.val_split", str(data["val_split"]),
                "--data.init_args.eval_batch_size", str(data["eval_batch_size"])]
    return cmd

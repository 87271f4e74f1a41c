"""The command-line words the CLI tests share (one place, no copied lists): a tiny run on
synthetic data with a test backbone, quiet and on the CPU. Each test adds only what it is about."""

from __future__ import annotations

from typing import Any

QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false", "--trainer.accelerator", "cpu"]


def word(value: Any) -> str:
    """A value as the command line spells it (booleans in YAML's lower case)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def options(prefix: str, values: dict[str, Any]) -> list[str]:
    """``--prefix.key value`` for each item, in order."""
    return [w for k, v in values.items() for w in (f"--{prefix}.{k}", word(v))]


def synthetic_run(backbone: str = "test_resnet", *, trainer: dict[str, Any] | None = None, **data: Any) -> list[str]:
    """``--model.backbone`` + ``SyntheticDataModule`` (32 px, batch 16, no augmentation unless
    ``data`` says otherwise) + the quiet CPU trainer, then ``trainer``'s options."""
    values = {"image_size": 32, "batch_size": 16, "augment": False, **data}
    return ["--model.backbone", backbone, "--data", "lit_ft.data.SyntheticDataModule",
            *options("data", values), *QUIET, *options("trainer", trainer or {})]

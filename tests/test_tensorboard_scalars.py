"""What a fit writes to TensorBoard, read back from the event files."""

from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lit_ft.cli import main
from tests.test_cli import TINY


def _events(run: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_lr_per_named_group_and_trainable_params_over_time():
    cli = main(
        ["fit", *TINY, "--trainer.max_epochs", "3", "--model.layer_decay", "0.5",
         "--model.freeze", "lit_ft.schedules.Gradual", "--trainer.log_every_n_steps", "1"],
        return_cli=True,
    )
    acc = _events(Path(cli.trainer.log_dir))
    tags = set(acc.Tags()["scalars"])
    groups = [g.name for g in cli.model.groups]
    assert {f"lr/{g}" for g in groups} <= tags, tags
    assert {"trainable_params", "train/loss", "val/loss", "val/acc", "val/f1"} <= tags
    head = [e.value for e in acc.Scalars("lr/head")]
    stem = [e.value for e in acc.Scalars("lr/stem")]
    assert all(abs(s / h - 0.5 ** (len(groups) - 1)) < 1e-6 for s, h in zip(stem, head))
    counts = [e.value for e in acc.Scalars("trainable_params")]
    assert counts == sorted(counts) and counts[0] < counts[-1]  # gradual: more groups over time
    assert counts[0] == sum(p.numel() for p in cli.model.model.get_classifier().parameters())
    texts = acc.Tags()["tensors"]
    assert any("lit-ft/plan" in t for t in texts)

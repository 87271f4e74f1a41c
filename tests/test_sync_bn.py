"""``trainer.sync_batchnorm`` and lit-ft's per-group BatchNorm handling.

Lightning's ``sync_batchnorm: true`` swaps every BatchNorm layer for a new SyncBatchNorm module
(``lightning.pytorch.plugins.TorchSyncBatchNorm``: ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``)
after the module's ``setup`` and before DDP wraps it. lit-ft finds BN layers by module name at
every epoch/step, so the converted layers must get the same treatment: frozen groups in eval mode
with their running statistics kept. The synchronisation itself needs GPUs (torch's DDP refuses a
model with SyncBatchNorm on CPU: "SyncBatchNorm layers only work with GPU modules"), so here the
converted model trains in one process, where SyncBatchNorm computes exactly what BatchNorm does;
benchmarks/gpu_check.py checks the cross-GPU part.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins import TorchSyncBatchNorm

from lit_ft.schedules import FreezeUnfreeze
from tests.helpers import snapshot, tiny_data, tiny_model, trainer

pytestmark = pytest.mark.usefixtures("one_thread")


class BNModes(L.Callback):
    """Per epoch: the class and training mode of every BN layer during that epoch's last step."""

    def __init__(self) -> None:
        self.seen: dict[int, dict[str, tuple[str, bool]]] = {}
        self.stats: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seen[trainer.current_epoch] = {
            n: (type(m).__name__, m.training) for n, m in pl_module.named_modules()
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
        }

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.stats[trainer.current_epoch] = {k: v.clone() for k, v in pl_module.state_dict().items() if k.endswith("running_mean")}


def fit(tmp_path, convert: bool) -> tuple[dict, dict, BNModes]:
    L.seed_everything(0)
    model = tiny_model(freeze=FreezeUnfreeze(epochs=1))
    if convert:
        model = TorchSyncBatchNorm().apply(model)  # what Trainer(sync_batchnorm=True) does under DDP
    before, modes = snapshot(model), BNModes()
    trainer(tmp_path, max_epochs=2, callbacks=[modes]).fit(model, tiny_data())
    return before, snapshot(model), modes


def test_sync_batchnorm_layers_of_frozen_groups_stay_in_eval_and_training_matches_plain_bn(tmp_path):
    before, after, modes = fit(tmp_path / "sync", convert=True)
    _, plain, _ = fit(tmp_path / "plain", convert=False)
    # Epoch 0 trains the head only: every converted layer in eval mode and its statistics kept.
    assert len(modes.seen[0]) > 10 and set(modes.seen[0].values()) == {("SyncBatchNorm", False)}
    # Epoch 1 trains everything: lit-ft switched the same layers to training mode.
    assert set(modes.seen[1].values()) == {("SyncBatchNorm", True)}
    stats = [k for k in before if k.endswith("running_mean")]
    assert all(torch.equal(modes.stats[0][k], before[k]) for k in stats)  # kept through epoch 0 ...
    assert all(not torch.equal(before[k], after[k]) for k in stats)  # ... updated in epoch 1 ...
    # ... and the run is the plain-BatchNorm run exactly (one process: nothing to synchronise).
    assert after.keys() == plain.keys()
    assert all(torch.equal(after[k], plain[k]) for k in after)

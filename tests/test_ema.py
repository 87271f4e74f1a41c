"""Weight averaging: EMA/SWA weights differ from the live ones, are validated, saved and resumed."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint

from lit_ft.callbacks import EMA, SWA
from lit_ft.schedules import LinearProbe
from tests.helpers import StopAfter, tiny_data, tiny_model, trainer

SGD = dict(optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9))


def _model_tensors(module) -> dict[str, torch.Tensor]:
    return {f"model.{k}": v.detach().clone() for k, v in module.model.state_dict().items()}


class Spy(L.Callback):
    """Live weights at the end of each epoch's training, and the weights each validation used."""

    def __init__(self):
        self.live, self.validated, self.val_loss = [], [], []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.is_last_batch:
            self.live.append(_model_tensors(module))

    def on_validation_epoch_start(self, trainer, module):
        self.validated.append(_model_tensors(module))  # runs after EMA's hook: EMA is listed first
        self.val_loss.append(0.0)

    def on_validation_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0):
        x, y = batch
        self.val_loss[-1] += F.cross_entropy(module(x), y, reduction="sum").item()


def _float_params(d):
    return {k: v for k, v in d.items() if v.is_floating_point() and "running" not in k}


def _same(a, b):
    return [k for k in b if not torch.equal(a[k], b[k])] == []


def test_ema_weights_differ_from_live_ones_are_validated_and_saved(tmp_path):
    L.seed_everything(0)
    model = tiny_model(**SGD)
    ema, spy = EMA(decay=0.9), Spy()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", monitor="val/acc", mode="max", save_top_k=-1)
    t = trainer(tmp_path, max_epochs=2, enable_checkpointing=True, callbacks=[ema, spy, ckpt])
    t.fit(model, tiny_data())
    avg, live = ema.average, spy.live[-1]
    assert ema.n_averaged == 2 * 4 and ema.current_decay() == min(0.9, 9 / 18)  # warm-up: (1 + n) / (10 + n)
    differ = [k for k in _float_params(live) if not torch.equal(avg[k], live[k])]
    assert len(differ) > 0.9 * len(_float_params(live))  # the average is not the live network
    # Validation ran on the averaged weights (the last validation is after the last update)...
    assert _same(spy.validated[-1], avg)
    # ...and the logged val/loss is the averaged network's loss.
    assert abs(t.callback_metrics["val/loss"].item() - spy.val_loss[-1] / 32) < 1e-5
    # Each checkpoint's state_dict is the average validated at its epoch; the live weights ride along.
    for epoch in (0, 1):
        saved = torch.load(next((tmp_path / "ck").glob(f"epoch={epoch}-*.ckpt")), weights_only=True)
        assert _same(saved["state_dict"], spy.validated[epoch])
        assert _same(saved["callbacks"]["EMA"]["live_state_dict"], spy.live[epoch])
    # After fit the model holds the average; a checkpoint saved now still carries the live weights.
    assert _same(model.state_dict(), avg)
    t.save_checkpoint(tmp_path / "after.ckpt")
    after = torch.load(tmp_path / "after.ckpt", weights_only=True)
    assert _same(after["state_dict"], avg) and _same(after["callbacks"]["EMA"]["live_state_dict"], live)
    # Testing a checkpoint inside the same process uses its (averaged) weights, not the live ones.
    first = next((tmp_path / "ck").glob("epoch=0-*.ckpt"))
    t.test(model, tiny_data(), ckpt_path=str(first), weights_only=True, verbose=False)
    assert _same(model.state_dict(), spy.validated[0])


def test_ema_of_a_frozen_parameter_is_the_parameter(tmp_path):
    model = tiny_model(**SGD, freeze=LinearProbe())
    ema = EMA(decay=0.5)
    trainer(tmp_path, max_epochs=1, callbacks=[ema]).fit(model, tiny_data())
    live, avg = ema._live_final, ema.average
    body = [k for k in avg if not k.startswith("model.fc.")]
    assert all(torch.equal(avg[k], live[k]) for k in body)  # frozen (and their BN stats): identical
    assert not torch.equal(avg["model.fc.weight"], live["model.fc.weight"])


def test_resume_restores_the_average_and_the_live_weights(tmp_path):
    def run(root, callbacks, ckpt_path=None):
        L.seed_everything(0)
        model = tiny_model(**SGD)
        ema = EMA(decay=0.95)
        t = trainer(root, max_epochs=3, callbacks=[ema, *callbacks])
        t.fit(model, tiny_data(), ckpt_path=ckpt_path)
        return t, model, ema

    _, full, full_ema = run(tmp_path / "a", [])
    t, _, _ = run(tmp_path / "b", [StopAfter(2)])
    t.save_checkpoint(tmp_path / "mid.ckpt")
    _, resumed, resumed_ema = run(tmp_path / "c", [], ckpt_path=str(tmp_path / "mid.ckpt"))
    assert resumed_ema.n_averaged == full_ema.n_averaged == 12
    for k in full_ema.average:
        assert torch.equal(resumed_ema.average[k], full_ema.average[k]), k
        assert torch.equal(resumed_ema._live_final[k], full_ema._live_final[k]), k


def test_swa_is_the_mean_of_the_epoch_end_weights_from_start_epoch(tmp_path):
    ends = []

    class EpochEnds(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if trainer.is_last_batch:
                ends.append(_model_tensors(module))

    L.seed_everything(0)
    model = tiny_model(**SGD)
    swa = SWA(start_epoch=1)
    trainer(tmp_path, max_epochs=3, callbacks=[swa, EpochEnds()]).fit(model, tiny_data())
    assert swa.n_averaged == 2
    for k in _float_params(swa.average):
        assert torch.allclose(swa.average[k], (ends[1][k] + ends[2][k]) / 2, atol=1e-6), k


def test_ema_before_start_step_is_the_live_model_and_averaging_starts_from_the_weights_there(tmp_path):
    # 4 steps per epoch; averaging starts after step 4, so the first validation (after step 4)
    # must see the live weights, and the second an EMA that began at the step-4 weights: the
    # fit-start weights must play no part.
    L.seed_everything(0)
    model = tiny_model(**SGD)
    ema, spy = EMA(decay=0.5, warmup=False, start_step=4), Spy()
    start = _model_tensors(model)
    trainer(tmp_path, max_epochs=2, callbacks=[ema, spy]).fit(model, tiny_data())
    assert ema.n_averaged == 4
    assert _same(spy.validated[0], spy.live[0])  # step 4: not averaging yet, validated the live model

    class Steps(L.Callback):  # live weights after every step of a second, identical run
        def __init__(self):
            self.after = []

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.after.append(_model_tensors(module))

    L.seed_everything(0)
    steps = Steps()
    trainer(tmp_path / "again", max_epochs=2, callbacks=[steps]).fit(tiny_model(**SGD), tiny_data())
    assert _same(steps.after[3], spy.live[0])  # the two runs train identically
    expected = {k: v.clone() for k, v in steps.after[3].items()}  # the average starts at step 4's weights
    for live in steps.after[4:]:
        for k, v in expected.items():
            if v.is_floating_point():
                v.lerp_(live[k], 0.5)
            else:
                v.copy_(live[k])
    params = _float_params(expected)
    assert all(torch.equal(spy.validated[1][k], params[k]) for k in params)
    assert not torch.equal(expected["model.fc.weight"], start["model.fc.weight"])


def test_resuming_before_ema_start_step_starts_quietly_from_the_live_weights(recwarn):
    from types import SimpleNamespace

    from lightning.pytorch.trainer.states import TrainerFn

    ema = EMA(start_step=100)
    fitting = SimpleNamespace(state=SimpleNamespace(fn=TrainerFn.FITTING))
    ema.on_load_checkpoint(fitting, None, {"callbacks": {"EMA": {"n_averaged": 0, "last_step": 0}}})
    assert ema.average is None and not [w for w in recwarn if "averaging state" in str(w.message)]
    ema.on_load_checkpoint(fitting, None, {"callbacks": {}})  # an EMA added to a run that had none
    assert [w for w in recwarn if "averaging state" in str(w.message)]

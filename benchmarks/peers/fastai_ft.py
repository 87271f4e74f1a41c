"""Peer: fastai's ``vision_learner`` on the timm architecture, trained with ``fine_tune``.

As fastai documents it (https://docs.fast.ai/vision.learner.html#vision_learner: a timm model is
named by a string; https://docs.fast.ai/callback.schedule.html#learner.fine_tune): ``fine_tune``
trains the head for ``freeze_epochs=1`` epoch (one-cycle), then the whole network for ``epochs``
more (one-cycle, discriminative LRs ``slice(base_lr/100, base_lr/2)``), ``base_lr=2e-3``; the
learner's defaults (Adam, CrossEntropyLossFlat, fastai's head with concat pooling, BatchNorm and
dropout, ``train_bn=True``). With ``lr_find=True`` the base LR is ``lr_find()``'s valley, as
fastai's tutorials suggest (the search's time counts).

The data are the benchmark's plain PyTorch loaders wrapped in ``DataLoaders`` (fastai's guide to
plain PyTorch: https://docs.fast.ai/examples/migrating_pytorch.html); they are already
normalised with the model's ImageNet statistics, hence ``normalize=False``; plain loaders carry no
target type, so the loss fastai picks for single-label categories, ``CrossEntropyLossFlat``, is
named explicitly. The weights are the
same offline ImageNet file, loaded by timm's ``pretrained=True`` through ``pretrained_cfg_overlay``
(``vision_learner`` passes extra keyword arguments on to ``timm.create_model``). Channels-last via
fastai's ``Learner.to_channelslast`` (https://docs.fast.ai/callback.channelslast.html), without its
default fp16 AMP, which a CPU has no use for.

Total passes over the data = 1 frozen epoch + ``epochs - 1`` unfrozen, the same as every peer.
Run as a child of ``python -m benchmarks.peers``; the run spec comes from the environment.
"""

from __future__ import annotations

from benchmarks.peers import data as D
from benchmarks.peers.probe import Probe, read_spec


def available() -> str | None:
    """None when fastai can be imported; else why this peer is skipped."""
    import importlib.util

    if importlib.util.find_spec("fastai") is None:
        return "fastai is not installed (pip install 'lit-ft[bench]')"
    return None


def main() -> None:
    from fastai.callback.core import Callback
    from fastai.vision.all import CrossEntropyLossFlat, DataLoaders, accuracy, set_seed, vision_learner

    class ProbeCallback(Callback):
        """The benchmark's probe as a fastai callback (after each training batch)."""

        order = 100  # after the optimizer step and the other callbacks

        def __init__(self, probe: Probe) -> None:
            self.probe = probe

        def before_fit(self):
            self.probe.started()

        def after_batch(self):
            if self.training:
                self.probe.after_batch(len(self.yb[0]), self.model)

    spec = read_spec()
    dspec = D.DataSpec.from_json(spec["data"])
    set_seed(dspec.seed)
    train, val = D.loaders(dspec)
    dls = DataLoaders(train, val)
    learn = vision_learner(dls, D.ARCH, n_out=D.NUM_CLASSES, normalize=False, loss_func=CrossEntropyLossFlat(),
                           metrics=accuracy, path=spec["run_dir"],
                           pretrained=True, pretrained_cfg_overlay=dict(file=spec["weights"]))
    learn.to_channelslast(use_amp=False)
    probe = Probe(spec)
    base_lr = 2e-3  # fine_tune's default
    with learn.no_bar():
        if spec.get("lr_find"):
            probe.started()  # the LR search is part of this recipe's time
            base_lr = float(learn.lr_find(show_plot=False).valley)
        learn.fine_tune(spec["epochs"] - 1, base_lr=base_lr, freeze_epochs=1, cbs=[ProbeCallback(probe)])
    probe.finish(learn.model, {"base_lr": base_lr, "epochs_run": spec["epochs"]})


if __name__ == "__main__":
    main()

"""Cached-feature linear probing: same result as re-running the frozen backbone, far cheaper."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from lit_ft import ImageClassifier
from lit_ft.schedules import LPFT, LinearProbe
from tests.helpers import snapshot, tiny_data, tiny_model, trainer


class BatchKinds(L.Callback):
    def __init__(self):
        self.kinds = {}

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.kinds.setdefault(trainer.current_epoch, "features" if batch[0].ndim == 2 else "images")


def _probe(tmp_path, cache, data_kw=None, **kw):
    L.seed_everything(0)
    model = tiny_model(freeze=LinearProbe(), cache_features=cache, **kw)
    kinds = BatchKinds()
    t = trainer(tmp_path, max_epochs=3, callbacks=[kinds])
    t.fit(model, tiny_data(**(data_kw or {})))
    return model, t, kinds.kinds


@pytest.mark.parametrize("batch_transforms", [False, True], ids=["pil", "batch_transforms"])
def test_cached_probe_matches_rerunning_the_frozen_backbone(tmp_path, batch_transforms):
    data_kw = {"batch_transforms": batch_transforms}
    plain, t_plain, k_plain = _probe(tmp_path / "a", cache=False, data_kw=data_kw)
    cached, t_cached, k_cached = _probe(tmp_path / "b", cache=True, data_kw=data_kw)
    assert set(k_plain.values()) == {"images"} and set(k_cached.values()) == {"features"}
    a, b = snapshot(plain), snapshot(cached)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    assert t_cached.callback_metrics["val/acc"] == t_plain.callback_metrics["val/acc"]
    # Backbone ran once per split (train, val), not once per epoch.
    assert cached.feature_cache.store.hits["computed"] == 2


def test_disk_cache_is_reused_by_a_second_run_and_invalidated_by_new_weights(tmp_path):
    first, _, _ = _probe(tmp_path / "a", cache=True, feature_cache_dir=str(tmp_path / "cache"))
    assert first.feature_cache.store.hits["computed"] == 2 and len(list((tmp_path / "cache").glob("*.pt"))) == 2
    second, _, _ = _probe(tmp_path / "b", cache=True, feature_cache_dir=str(tmp_path / "cache"))
    assert second.feature_cache.store.hits == {"memory": second.feature_cache.store.hits["memory"], "disk": 2, "computed": 0}
    torch.manual_seed(99)  # other backbone weights -> other features -> recomputed
    other = tiny_model(freeze=LinearProbe(), cache_features=True, feature_cache_dir=str(tmp_path / "cache"))
    with torch.no_grad():
        other.model.layer1[0].conv1.weight.mul_(1.5)
    trainer(tmp_path / "c", max_epochs=1).fit(other, tiny_data())
    assert other.feature_cache.store.hits["computed"] == 2


def test_lp_ft_uses_cached_features_then_images(tmp_path):
    model = tiny_model(freeze=LPFT(lp_epochs=2), cache_features=True)
    before = snapshot(model)
    kinds = BatchKinds()
    trainer(tmp_path, max_epochs=3, callbacks=[kinds]).fit(model, tiny_data())
    assert kinds.kinds == {0: "features", 1: "features", 2: "images"}
    after = snapshot(model)
    assert not torch.equal(before["model.layer1.0.conv1.weight"], after["model.layer1.0.conv1.weight"])


def test_augmented_inputs_are_cached_only_as_fixed_views(tmp_path):
    no_views, _, kinds = _probe(tmp_path / "a", cache=True)
    model = tiny_model(freeze=LinearProbe(), cache_features=True)
    kinds = BatchKinds()
    trainer(tmp_path / "b", max_epochs=2, callbacks=[kinds]).fit(model, tiny_data(augment=True))
    assert set(kinds.kinds.values()) == {"images"} and model.feature_cache.store.hits["computed"] == 1  # val only
    model = tiny_model(freeze=LinearProbe(), cache_features=True, cache_views=2)
    kinds = BatchKinds()
    trainer(tmp_path / "c", max_epochs=3, callbacks=[kinds]).fit(model, tiny_data(augment=True))
    assert set(kinds.kinds.values()) == {"features"}
    assert model.feature_cache.store.hits["computed"] == 3  # 2 train views + val, epoch 2 reuses view 0


def test_checkpoint_of_a_cached_probe_is_an_ordinary_model(tmp_path):
    model = tiny_model(freeze=LinearProbe(), cache_features=True)
    t = trainer(tmp_path, max_epochs=1)
    data = tiny_data()
    t.fit(model, data)
    t.save_checkpoint(tmp_path / "m.ckpt")
    loaded = ImageClassifier.load_from_checkpoint(tmp_path / "m.ckpt", weights_only=True, optimizer=torch.optim.SGD)
    loaded.eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), model.eval()(x))


def test_the_disk_cache_key_covers_the_preprocessing_of_batch_transforms(tmp_path):
    # With batch_transforms the dataset yields raw uint8 images whatever the image size, so the
    # key must include the on-device transform and the resolved data config.
    kw = dict(cache=True, feature_cache_dir=str(tmp_path / "cache"))
    first, _, _ = _probe(tmp_path / "a", data_kw={"batch_transforms": True, "image_size": 32}, **kw)
    other, _, _ = _probe(tmp_path / "b", data_kw={"batch_transforms": True, "image_size": 40}, **kw)
    assert other.feature_cache.store.hits["computed"] == 2 and other.feature_cache.store.hits["disk"] == 0
    again, _, _ = _probe(tmp_path / "c", data_kw={"batch_transforms": True, "image_size": 40}, **kw)
    assert again.feature_cache.store.hits == {"memory": again.feature_cache.store.hits["memory"], "disk": 2, "computed": 0}


def test_a_step_unit_plan_that_unfreezes_mid_epoch_trains_on_images_from_the_start(tmp_path):
    from lit_ft.schedules import Gradual

    # 64 images / batch 16 = 4 steps per epoch; the top body group unfreezes at step 2 of epoch 0.
    model = tiny_model(freeze=Gradual(every=2, unit="step"), cache_features=True)
    before = snapshot(model)
    kinds = BatchKinds()
    trainer(tmp_path, max_epochs=1, callbacks=[kinds]).fit(model, tiny_data())
    assert kinds.kinds == {0: "images"}  # a cached epoch would give layer4 no gradient after step 2
    assert not torch.equal(before["model.layer4.0.conv1.weight"], model.state_dict()["model.layer4.0.conv1.weight"])


def test_disk_cached_augmented_views_belong_to_their_shuffle_seed(tmp_path):
    # Runs on the same images with another shuffle_seed draw other augmented views: a shared
    # disk cache must not hand one run's views to the other (the same seed reuses them).
    def run(name: str, shuffle_seed: int):
        L.seed_everything(0)  # the same backbone weights in every run
        model = tiny_model(freeze=LinearProbe(), cache_features=True, cache_views=2, feature_cache_dir=str(tmp_path / "cache"))
        trainer(tmp_path / name, max_epochs=2).fit(model, tiny_data(augment=True, shuffle_seed=shuffle_seed))
        return model.feature_cache.store.hits

    assert run("a", 1)["computed"] == 3  # 2 train views + val
    assert run("b", 1)["computed"] == 0  # all 3 from disk
    assert run("c", 2)["computed"] == 2 and run("c2", 2)["computed"] == 0  # new views; val (not augmented) is shared

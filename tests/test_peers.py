"""The peer benchmark (python -m benchmarks.peers): its measures, its report, the data it hands
every peer (checked against lit-ft's own datamodule), its probe, and a smoke run of the installed
peers end to end."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from torch import nn

from benchmarks.peers import data as D
from benchmarks.peers import runner as R
from benchmarks.peers import summary as S
from benchmarks.peers.probe import Probe

needs_fmnist = pytest.mark.skipif(not (D.FASHION_MNIST / "t10k-labels-idx1-ubyte.gz").is_file()
                                  and not (D.FASHION_MNIST / "t10k-labels-idx1-ubyte").is_file(),
                                  reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")


def record(peer, setting="full", seed=0, points=((60, 100, 0.5), (120, 200, 0.9)), **kw):
    r = {"peer": peer, "setting": setting, "seed": seed, "epochs": 2, "points": [list(p) for p in points],
         "setup_seconds": 10.0, "peak_rss_mb": 1000.0, "processes": 1, "threads": 2, "test_images": 10_000,
         "train_images": 100, "data": {"val_split": 2000, "batch_size": 64}, "machine": "m", "versions": {"torch": "x"}}
    r.update(kw)
    return r


# --------------------------------------------------------------------------- measures


def test_time_to_interpolates_between_the_test_points_around_the_target():
    points = [[60, 1, 0.50], [120, 2, 0.80], [180, 3, 0.90]]
    assert S.time_to(points, 0.85) == pytest.approx(150.0)  # halfway from 0.80 to 0.90
    assert S.time_to(points, 0.40) == 60.0  # reached at the first point: no earlier one to interpolate from
    assert S.time_to(points, 0.95) is None


def test_time_to_takes_the_first_crossing_even_if_accuracy_dips_later():
    assert S.time_to([[10, 1, 0.9], [20, 2, 0.7], [30, 3, 0.95]], 0.85) == 10.0


def test_accuracy_at_a_budget_is_the_last_point_taken_by_then_and_a_finished_run_keeps_its_final():
    points = [[60, 1, 0.5], [120, 2, 0.8]]
    assert S.acc_at(points, 59) is None
    assert S.acc_at(points, 119) == 0.5
    assert S.acc_at(points, 10_000) == 0.8


def test_headline_ratio_is_lit_fts_time_to_the_peers_final_accuracy_over_the_peers_time():
    lit = record("lit-ft", points=[[100, 1, 0.80], [200, 2, 0.90], [300, 3, 0.92]])
    peer = record("timm", points=[[200, 1, 0.80], [400, 2, 0.90]])  # final 0.90 after 400 s
    rows = S.headline([lit, peer], "full", {"lit-ft": "lit-ft", "timm": "timm"}, budget_s=250)
    assert len(rows) == 1 and rows[0]["peer"] == "timm"
    assert rows[0]["ratio"] == pytest.approx(200 / 400)
    assert rows[0]["ahead_at_budget"]  # at 250 s: lit-ft 0.90, timm 0.80

    slow_lit = record("lit-ft", points=[[100, 1, 0.70], [500, 2, 0.85]])
    rows = S.headline([slow_lit, peer], "full", {"lit-ft": "lit-ft", "timm": "timm"}, budget_s=250)
    assert rows[0]["ratio"] is None and not rows[0]["ahead_at_budget"]
    assert "never reached" in S.headline_table(rows, 0.7)


def test_findings_say_who_wins_where_and_whether_the_target_is_met():
    labels = {"lit-ft": "lit-ft", "timm": "timm", "fastai": "fastai"}
    recs = [record("lit-ft", points=[[100, 1, 0.80], [200, 2, 0.91]]),
            record("timm", points=[[200, 1, 0.80], [400, 2, 0.90]]),  # lit-ft: 0.90 at ~182 s, 0.45x, ahead at 300 s
            record("fastai", points=[[100, 1, 0.85], [150, 2, 0.93]])]  # more accurate and sooner: lit-ft never gets there
    facts = S.findings(recs, "full", labels, budget_s=300, target=0.90, max_ratio=0.7)
    assert "Most accurate at the end: fastai, 93.0%." in facts
    assert "First to 90%: fastai, 2.2 min." in facts  # 100 s + 5/8 of 50 s
    assert facts[-1] == ("Target (lit-ft reaches each peer's final accuracy in <= 0.7x its time and is at least as "
                         "accurate at 5 min): met against timm; not met against fastai.")


def test_headline_pairs_runs_by_seed():
    lit = [record("lit-ft", seed=0, points=[[100, 1, 0.9]]), record("lit-ft", seed=1, points=[[300, 1, 0.9]])]
    peer = [record("timm", seed=0, points=[[200, 1, 0.9]]), record("timm", seed=1, points=[[300, 1, 0.9]])]
    (row,) = S.headline(lit + peer, "full", {"lit-ft": "a", "timm": "b"}, 1000)
    assert row["ratio"] == pytest.approx((100 / 200 + 300 / 300) / 2)
    assert row["seeds"] == [0, 1]


def test_records_round_trip_sorted_and_a_rerun_replaces_its_line(tmp_path):
    path = tmp_path / "r.jsonl"
    recs = [record("timm", seed=1), record("lit-ft", seed=0), record("timm", seed=0)]
    S.save_records(path, recs)
    assert [(r["peer"], r["seed"]) for r in S.load_records(path)] == [("lit-ft", 0), ("timm", 0), ("timm", 1)]
    again = S.upsert(S.load_records(path), record("timm", seed=0, points=[[1, 1, 0.1]]))
    assert len(again) == 3 and [r["points"] for r in again if (r["peer"], r["seed"]) == ("timm", 0)] == [[[1, 1, 0.1]]]
    path.write_text(path.read_text() + '{"peer": "x"}\n')
    with pytest.raises(ValueError, match="r.jsonl:4: not a run record"):
        S.load_records(path)


def test_runs_are_interleaved_with_the_peer_order_rotated_per_block():
    order = R.schedule(["a", "b", "c"], ["full", "10pct"], [0, 1])
    blocks = [order[i:i + 3] for i in range(0, len(order), 3)]
    assert len(blocks) == 4 and all(sorted(p for p, _, _ in b) == ["a", "b", "c"] for b in blocks)
    assert [b[0][0] for b in blocks] == ["a", "b", "c", "a"]
    assert {(s, seed) for b in blocks for _, s, seed in b} == {("full", 0), ("10pct", 0), ("full", 1), ("10pct", 1)}


# --------------------------------------------------------------------------- skipped peers


def test_fastai_peer_says_it_is_skipped_and_why_when_fastai_is_missing(monkeypatch):
    import importlib.util

    from benchmarks.peers import fastai_ft

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fastai" else real(name, *a))
    why = fastai_ft.available()
    assert "fastai is not installed" in why and "lit-ft[bench]" in why


def test_report_names_each_missing_peer_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.setitem(R.PEERS, "fastai", R.Peer("fastai fine_tune", "m", "c", lambda: "fastai is not installed (pip install 'lit-ft[bench]')"))
    recs = [record("lit-ft"), record("timm", points=[[100, 1, 0.7], [200, 2, 0.8]])]
    body = R.write_report(recs, tmp_path / "B.md", tmp_path / "p.png", tmp_path / "r.jsonl", smoke=False,
                          skipped={"lightning": "failed: exit status 1; log x"})
    assert "**fastai fine_tune** (fastai is not installed (pip install 'lit-ft[bench]'))" in body
    assert "**Lightning BackboneFinetuning** (failed: exit status 1; log x)" in body
    assert "| timm + PyTorch loop | 80.0 | 3.3 |" in body  # the headline row: timm's final accuracy and time
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert R.write_report(recs, tmp_path / "B.md", tmp_path / "p.png", tmp_path / "r.jsonl", False,
                          {"lightning": "failed: exit status 1; log x"}) == body


def test_report_names_the_machine_of_each_setting_when_the_settings_ran_on_different_ones(tmp_path):
    # Ratios compare runs within one setting; settings run in different sessions may sit on different CPUs.
    recs = [record("lit-ft", machine="Xeon"), record("timm", machine="Xeon"),
            record("lit-ft", setting="10pct", machine="EPYC"), record("timm", setting="10pct", machine="EPYC")]
    body = R.write_report(recs, tmp_path / "B.md", tmp_path / "p.png", tmp_path / "r.jsonl", False, {})
    assert f"Machine: Xeon ({R.SETTINGS['full'].name}); EPYC ({R.SETTINGS['10pct'].name}). Versions" in body
    one = R.write_report(recs[:2], tmp_path / "B.md", tmp_path / "p.png", tmp_path / "r.jsonl", False, {},
                         settings={"full": R.SETTINGS["full"]})
    assert "Machine: Xeon. Versions" in one
    same = [dict(r, machine="Xeon") for r in recs]  # both settings on one machine: named once
    assert "Machine: Xeon. Versions" in R.write_report(same, tmp_path / "B.md", tmp_path / "p.png", tmp_path / "r.jsonl", False, {})


# --------------------------------------------------------------------------- same data as lit-ft


def test_recipe_data_reads_the_recipes_and_counts_the_global_batch():
    full = D.recipe_data([R.ROOT / "configs/experiments/_base.yaml", R.ROOT / "configs/experiments/cpu_best.yaml"], 1.0, seed=0)
    assert (full.batch_size, full.val_split, full.scale, full.image_size, full.crop_pct) == (64, 2000, (0.85, 1.0), 64, 1.0)
    quick = D.recipe_data(R.ROOT / "configs/quickstart.yaml", 0.1, seed=3)
    assert (quick.batch_size, quick.scale, quick.seed, quick.train_subset) == (64, (0.7, 1.0), 3, 0.1)


@needs_fmnist
def test_peers_get_the_same_images_split_and_transforms_as_lit_fts_datamodule():
    from lit_ft.data import TorchvisionDataModule

    spec = D.recipe_data(R.ROOT / "configs/quickstart.yaml", 0.1, seed=3)
    dm = TorchvisionDataModule(name="fashion_mnist", image_size=spec.image_size, crop_pct=spec.crop_pct, scale=spec.scale,
                               hflip=spec.hflip, train_subset=spec.train_subset, val_split=spec.val_split, seed=spec.seed)
    dm.set_data_config(timm.data.resolve_data_config(model=timm.create_model(D.ARCH)))
    dm.setup("fit")
    train, val = D.datasets(spec)
    assert len(train) == 5800 and len(val) == 2000
    np.testing.assert_array_equal(train.indices, dm.train_dataset.indices)
    np.testing.assert_array_equal(val.indices, dm.val_dataset.indices)
    for i in (0, 17, 1999):  # the eval transform, image for image
        assert torch.equal(val[i][0], dm.val_dataset[i][0]) and val[i][1] == dm.val_dataset[i][1]
    for i in (0, 4321):  # the training augmentation, from the same random state
        random.seed(i), torch.manual_seed(i)
        ours = train[i]
        random.seed(i), torch.manual_seed(i)
        assert torch.equal(ours[0], dm.train_dataset[i][0]) and ours[1] == dm.train_dataset[i][1]


@needs_fmnist
def test_the_timm_named_weights_file_is_the_package_weights(tmp_path):
    from lit_ft.backbones import create_backbone

    path = D.timm_weights_file(tmp_path / "w.safetensors")
    via_timm = timm.create_model(D.ARCH, pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=str(path)))
    via_lit_ft = create_backbone(D.ARCH, num_classes=10, pretrained=D.WEIGHTS_PACKAGE)
    ref = via_lit_ft.state_dict()
    for k, v in via_timm.state_dict().items():
        assert torch.equal(v, ref[k]), k


# --------------------------------------------------------------------------- the probe


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3, 10)

    def forward(self, x):
        return self.fc(self.bn(x).mean((2, 3)))


@needs_fmnist
def test_probe_leaves_training_alone_and_its_time_off_the_clock(tmp_path):
    spec = {"peer": "p", "setting": "s", "seed": 0, "launch": 0.0, "eval_every": 64, "test_images": 100,
            "out": str(tmp_path / "out.json"), "data": D.recipe_data(R.ROOT / "configs/quickstart.yaml", 128, 0).to_json()}
    probe = Probe(spec)
    net = Net().train()
    net.bn.eval()  # a frozen BatchNorm inside a training model (lit-ft's and Lightning's freezing)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    probe.after_batch(32, net)
    assert probe.points == []  # no mark passed yet
    probe.after_batch(40, net)  # 72 >= 64: evaluate
    assert len(probe.points) == 1 and probe.points[0][1] == 72 and 0.0 <= probe.points[0][2] <= 1.0
    assert net.training and net.fc.training and not net.bn.training  # every module's own flag restored
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())  # BN statistics untouched
    assert probe.excluded > 0
    probe.after_batch(64, net)  # 136: the next mark (128) is passed once, not twice
    assert [p[1] for p in probe.points] == [72, 136] and probe.next_mark == 192
    probe.finish(net)
    out = json.loads(Path(spec["out"]).read_text())
    assert [p[1] for p in out["points"]] == [72, 136] and out["processes"] == 1  # the last point was the end already


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
@needs_fmnist
def test_smoke_run_of_the_installed_peers_writes_consistent_records_and_report(tmp_path, capsys):
    """Every installed peer on 128 images (2 epochs), plus lit-ft's DDP recipe on 256: runs finish,
    the probe counted every training image, times grow, accuracies are accuracies, the report
    names what was skipped, and --report-only rebuilds it byte for byte."""
    out = tmp_path / "smoke"
    R.main(["--smoke", "--out", str(out), "--settings", "10pct"])
    R.main(["--smoke", "--out", str(out), "--settings", "full", "--peers", "lit-ft"])
    records = S.load_records(out / "peers_runs.jsonl")
    installed = [p for p in R.DEFAULT_PEERS if R.PEERS[p].available() is None]
    assert sorted(r["peer"] for r in records if r["setting"] == "10pct") == sorted(installed)
    assert [r["peer"] for r in records if r["setting"] == "full"] == ["lit-ft"]
    for r in records:
        seconds, images, accs = zip(*r["points"])
        assert all(a < b for a, b in zip(seconds, seconds[1:])), r["peer"]
        assert all(a < b for a, b in zip(images, images[1:])), r["peer"]
        assert images[-1] == r["epochs"] * r["train_images"], r["peer"]  # every training image counted, once
        assert all(0.0 <= a <= 1.0 for a in accs)
        assert 0 < r["setup_seconds"] < seconds[0]
        assert r["peak_rss_mb"] > 100 and r["smoke"]
        assert r["processes"] == (2 if (r["peer"], r["setting"]) == ("lit-ft", "full") else 1)
    md = (out / "BENCHMARKS.md").read_text()
    assert f"## {R.SECTION}" in md and "Smoke run" in md
    for p in installed:
        assert f"| {R.PEERS[p].label} |" in md
    for p in set(R.DEFAULT_PEERS) - set(installed):
        assert f"**{R.PEERS[p].label}** ({R.PEERS[p].available()})" in md
    assert (out / "peers_accuracy_vs_time.png").is_file()
    R.main(["--smoke", "--out", str(out), "--report-only"])
    assert (out / "BENCHMARKS.md").read_text() == md


def test_report_only_without_records_writes_nothing(tmp_path, capsys):
    R.main(["--out", str(tmp_path), "--report-only"])
    assert "no runs recorded" in capsys.readouterr().out
    assert not (tmp_path / "BENCHMARKS.md").exists()

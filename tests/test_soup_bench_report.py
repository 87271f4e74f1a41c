"""The weight-averaging benchmark's report: its verdicts on the targets follow from the recorded
numbers, per seed, and it says where a target is missed."""

from __future__ import annotations

import argparse

from benchmarks.soup_bench import MODELS, load_records, record, report

CORRUPTIONS = ["gaussian_noise", "contrast"]


def results(best: float, greedy: float, wise: tuple[float, float], shift: float = 0.70) -> dict:
    def model(clean: float, corrupted: float, **extra) -> dict:
        return {"val_acc": clean, "clean_acc": clean, "clean_subset_acc": clean, "mean_corruption_acc": corrupted,
                "per_corruption": dict.fromkeys(CORRUPTIONS, corrupted), "per_severity": {"1": corrupted}, **extra}

    out = {key: model(best, shift, ingredients=3, bn="recomputed") for key, _ in MODELS}
    out["best_single"] = model(best, shift, checkpoint="x.ckpt", variant="base")
    out["greedy"] = model(greedy, shift, ingredients=2, bn="recomputed")
    out["wise"] = model(wise[0], wise[1], alpha=0.5, head="linear-probe head", grid_summary=["0: 80.0", "1: 88.0"])
    out["wise_nobn"] = model(best, shift, alpha=1.0, head="linear-probe head")
    out["ingredients"] = [{"variant": "base", "val_acc": best, "in_greedy": True, "greedy_val_acc_with_it": None}]
    return out


def args() -> argparse.Namespace:
    return argparse.Namespace(fraction=0.1, strategy="lp_ft", shift_subset=2000, smoke=False)


def test_the_report_judges_the_targets_from_every_seed(tmp_path):
    record(tmp_path, 0, results(0.880, 0.884, (0.879, 0.730)), {"base": 4.5})
    record(tmp_path, 1, results(0.880, 0.876, (0.877, 0.725)), {"base": 4.4})
    text = report(load_records(tmp_path), args(), "python benchmarks/soup_bench.py")
    assert "greedy soup >= best single on clean test: missed (1 of 2 seeds)" in text
    assert "WiSE-FT >= +2 pts mean corruption accuracy with <= 0.5 pt clean loss: met (mean +2.8 pts corrupted, -0.2 pts clean)" in text
    assert "| greedy soup (2 / 2 of 5 runs) | 88.0 ± 0.6 |" in text
    assert "WiSE-FT validation accuracy over a (seed 0): 0: 80.0, 1: 88.0" in text


def test_a_clean_loss_above_half_a_point_misses_the_wise_target_and_a_seed_rerun_replaces_its_lines(tmp_path):
    record(tmp_path, 0, results(0.880, 0.880, (0.870, 0.760)), {"base": 4.5})
    record(tmp_path, 0, results(0.880, 0.880, (0.870, 0.760)), {"base": 4.5})
    records = load_records(tmp_path)
    assert list(records) == [0] and len((tmp_path / "soup_runs.jsonl").read_text().splitlines()) == len(MODELS) + 1
    text = report(records, args(), "cmd")
    assert "clean loss: missed (mean +6.0 pts corrupted, -1.0 pts clean)" in text
    assert "greedy soup >= best single on clean test: met (1 of 1 seeds)" in text

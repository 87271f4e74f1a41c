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
    out["wise_tol"] = model(best, shift, alpha=1.0, head="linear-probe head")
    out["ingredients"] = [{"variant": "base", "val_acc": best, "in_greedy": True, "greedy_val_acc_with_it": None}]
    return out


def args() -> argparse.Namespace:
    return argparse.Namespace(fraction=0.1, strategy="lp_ft", shift_subset=2000, smoke=False)


def test_the_report_judges_the_targets_from_every_seed(tmp_path):
    record(tmp_path, 0, results(0.880, 0.884, (0.879, 0.730)), {"base": 4.5})
    record(tmp_path, 1, results(0.880, 0.876, (0.877, 0.725)), {"base": 4.4})
    text = report(load_records(tmp_path), args(), "python benchmarks/soup_bench.py")
    assert "greedy soup >= best single on clean test: missed (1 of 2 seeds)" in text
    assert "WiSE-FT >= +2 pts mean corruption accuracy with <= 0.5 pt clean loss: met (mean +2.8 pts corrupted, -0.2 pts clean; a chosen on validation: 0.5 / 0.5)" in text
    assert "| greedy soup (2 / 2 of 5 runs) | 88.0 ± 0.6 |" in text
    assert "WiSE-FT validation accuracy over a (seed 0): 0: 80.0, 1: 88.0" in text


def test_a_clean_loss_above_half_a_point_misses_the_wise_target_and_a_seed_rerun_replaces_its_lines(tmp_path):
    record(tmp_path, 0, results(0.880, 0.880, (0.870, 0.760)), {"base": 4.5})
    record(tmp_path, 0, results(0.880, 0.880, (0.870, 0.760)), {"base": 4.5})
    records = load_records(tmp_path)
    assert list(records) == [0] and len((tmp_path / "soup_runs.jsonl").read_text().splitlines()) == len(MODELS) + 1
    text = report(records, args(), "cmd")
    assert "clean loss: missed (mean +6.0 pts corrupted, -1.0 pts clean; a chosen on validation: 0.5)" in text
    assert "greedy soup >= best single on clean test: met (1 of 1 seeds)" in text


def test_the_tolerance_rule_and_the_robustness_curve_are_reported_against_the_best_single_run(tmp_path):
    for seed, (val, corrupted) in enumerate([(0.878, 0.69), (0.874, 0.70)]):
        r = results(0.880, 0.880, (0.880, 0.70))
        r["wise"]["alpha"] = 1.0
        r["wise_tol"] = {**r["wise"], "clean_acc": val, "mean_corruption_acc": corrupted, "alpha": 0.8}
        r["wise_curve"] = {"points": [{"a": 0.5, "val_acc": 0.84, "clean_test_acc": 0.83, "mean_corruption_acc": 0.74},
                                      {"a": 0.8, "val_acc": 0.88, "clean_test_acc": 0.87, "mean_corruption_acc": 0.71}],
                           "seconds": 60.0}
        record(tmp_path, seed, r, {"base": 4.5})
    text = report(load_records(tmp_path), args(), "cmd")
    # best single: 88.0 clean, 70.0 corrupted in both seeds; the rule: -0.2/-0.6 clean, -1.0/0.0 corrupted.
    assert "`--tolerance 0.005` (the smallest a within 0.5 pt of the best validation accuracy, a = 0.8 / 0.8): missed " \
           "(mean -0.5 pts corrupted, -0.4 pts clean)." in text
    assert "| WiSE-FT, a by the 0.5-pt rule (a = 0.8 / 0.8) | 87.6 ± 0.3 | 69.5 ± 0.7 | -0.4 / -0.5 |" in text
    assert "a chosen on validation: 1 / 1)" in text
    rows = [line for line in text.splitlines() if line.startswith("| 0.5 |") or line.startswith("| 0.8 |") or line.startswith("| 1 |")]
    assert rows == ["| 0.5 | 84.0 ± 0.0 | 83.0 ± 0.0 | 74.0 ± 0.0 | 84.0 / 83.0 / 74.0; 84.0 / 83.0 / 74.0 |",
                    "| 0.8 | 88.0 ± 0.0 | 87.0 ± 0.0 | 71.0 ± 0.0 | 88.0 / 87.0 / 71.0; 88.0 / 87.0 / 71.0 |",
                    "| 1 | 88.0 ± 0.0 | 88.0 ± 0.0 | 70.0 ± 0.0 | 88.0 / 88.0 / 70.0; 88.0 / 88.0 / 70.0 |"]
    assert "2000-image test subset of the shifted sets" in text


def test_training_minutes_come_from_the_budget_counter_of_the_run(tmp_path):
    import torch

    from benchmarks.soup_bench import train_minutes_of

    best = tmp_path / "best-epoch01.ckpt"
    torch.save({"callbacks": {"BudgetCounter": {"images_seen": 10, "train_seconds": 60.0}}}, best)
    assert train_minutes_of(best) == 1.0
    torch.save({"callbacks": {"BudgetCounter": {"images_seen": 20, "train_seconds": 150.0}}}, tmp_path / "last.ckpt")
    assert train_minutes_of(best) == 2.5  # the whole run, not the time to its best epoch
    torch.save({"callbacks": {}}, tmp_path / "last.ckpt")
    assert train_minutes_of(best) is None  # not known: left out, never a 0


def test_the_per_corruption_table_shows_each_distinct_model_once_and_names_the_twins(tmp_path):
    r = results(0.880, 0.880, (0.870, 0.760))
    r["greedy"]["per_corruption"] = dict(r["best_single"]["per_corruption"])  # a greedy soup of one run
    r["uniform_nobn"]["per_corruption"] = {"gaussian_noise": 0.75, "contrast": 0.65}
    record(tmp_path, 0, r, {"base": 4.5})
    text = report(load_records(tmp_path), args(), "cmd")
    header = next(line for line in text.splitlines() if line.startswith("| corruption |"))
    assert header == "| corruption | best single run | uniform soup, BN averaged | WiSE-FT of the best run |"
    assert "| gaussian_noise | 70.0 | 75.0 | 76.0 |" in text
    assert "the same in every cell as the best single run: uniform soup, greedy soup, greedy soup, BN averaged, " \
           "WiSE-FT, a by the 0.5-pt rule, WiSE-FT, BN interpolated." in text

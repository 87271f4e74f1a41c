"""benchmarks/smaller.py's report: computed from the record alone, targets judged on the numbers shown."""

from __future__ import annotations

from benchmarks.smaller import report


def record() -> dict:
    run = lambda acc: {"acc": acc, "wall": 600.0}  # noqa: E731
    cost = lambda params, macs, b1, b32: {"params": params, "macs": macs, "ms_b1": b1, "ms_b32": b32}  # noqa: E731
    return {
        "command": "python benchmarks/smaller.py", "date": "2026-01-01", "machine": "test CPU, 2 cores",
        "settings": {"teacher": "lite2", "alpha": 0.5, "temperature": 2.0, "ratio": 0.5, "importance": "magnitude",
                     "steps": 1, "recovery_teacher": "unpruned", "rounds": 7, "threads": 1},
        "runs": {"teacher": run(0.93), "lite0": run(0.92), "lite0_kd": run(0.925), "mnv3": run(0.88), "mnv3_kd": run(0.895),
                 "pruned": run(0.60), "pruned_ft": run(0.905), "pruned_ft_kd": run(0.915)},
        "costs": {"teacher": cost(4.8e6, 70e6, 10.0, 200.0), "lite0": cost(3.4e6, 32e6, 5.0, 100.0),
                  "lite0_kd": cost(3.4e6, 32e6, 5.0, 100.0), "mnv3": cost(0.58e6, 3e6, 1.0, 10.0),
                  "mnv3_kd": cost(0.58e6, 3e6, 1.0, 10.0), "pruned": cost(1.7e6, 16e6, 3.0, 50.0),
                  "pruned_ft": cost(1.7e6, 16e6, 3.0, 50.0), "pruned_ft_kd": cost(1.7e6, 16e6, 3.0, 50.0)},
    }


def test_the_report_computes_accuracy_per_millisecond_and_judges_each_target():
    text = report(record())
    row = next(line for line in text.splitlines() if line.startswith("| `lite0` |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2:9] == ["92.00", "3.40 M", "32 M", "5.00", "100.0", "18.4", "29"]  # 92 / 5 ms; 92 / (100 ms / 32)
    assert "into `lite0`: +0.50 points over the same student without a teacher (target >= +1: missed)" in text
    assert "into `mnv3`: +1.50 points" in text and "(target >= +1: met)" in text
    # 1.5 points below unpruned: missed; 1.67x and 2.00x faster: the slower of the two decides, met.
    assert "`pruned_ft` vs unpruned `lite0`: -1.50 points (target >= -1: missed); CPU latency 1.67x lower at batch 1, " \
           "2.00x at batch 32 (target >= 1.5x: met), with 2.00x fewer parameters and 2.00x fewer MACs." in text
    assert "`pruned_ft_kd` vs unpruned `lite0`: -0.50 points (target >= -1: met)" in text
    assert "Pruning alone, before any fine-tuning: -32.00 points against `lite0` (60.00%); fine-tuned: `pruned_ft` 90.50%, " \
           "`pruned_ft_kd` 91.50%." in text
    assert "unpruned Lite0 as teacher" in text


def test_missing_runs_leave_their_rows_and_verdicts_out():
    r = record()
    for step in ("mnv3_kd", "pruned_ft_kd"):
        del r["runs"][step], r["costs"][step]
    text = report(r)
    assert "`mnv3_kd`" not in text and "into `mnv3`" not in text and "`pruned_ft_kd` vs" not in text


def test_the_pruned_row_says_what_became_of_the_batchnorm_statistics():
    r = record()
    row = lambda text: next(line for line in text.splitlines() if line.startswith("| `pruned` |"))  # noqa: E731
    assert "recorded before `prune` recomputed them" in row(report(r))  # an old record: no bn_batches setting
    r["settings"]["bn_batches"] = 32
    assert "BN statistics recomputed on 32 batches" in row(report(r))
    r["settings"]["bn_batches"] = 0
    assert "BN statistics of the unpruned model (`--bn-batches 0`)" in row(report(r))

"""The robustness report: every (corruption, severity) cell is a real test run on the shifted
test split, the summary is the mean of the cells, and the command writes a table and TensorBoard."""

from __future__ import annotations

from pathlib import Path

import pytest

from lit_ft import ImageClassifier
from lit_ft.cli import main
from lit_ft.data.corruptions import Shift
from lit_ft.errors import UserError
from lit_ft.experiment import evaluate
from lit_ft.robustness import robustness_report
from tests.helpers import tiny_data
from tests.test_cli import TINY
from tests.tiny_runs import pretrained_file, train_run

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("robustness")
    return train_run(root, "run", pretrained_file(root))


def test_each_cell_is_the_test_accuracy_on_that_shifted_set_and_the_summary_their_mean(ckpt):
    model = ImageClassifier.load_from_checkpoint(ckpt, weights_only=True, pretrained=False)
    dm = tiny_data(test_size=64)
    report = robustness_report(model, dm, ["gaussian_noise", "contrast"], [1, 5], subset=24, accelerator="cpu")
    assert dm.shift is None  # put back
    assert set(report.acc) == {("gaussian_noise", 1), ("gaussian_noise", 5), ("contrast", 1), ("contrast", 5)}
    for (c, s), acc in report.acc.items():
        direct = tiny_data(test_size=64, shift=Shift(c, s, subset=24))
        assert evaluate(model, direct, accelerator="cpu")["test/acc"] == pytest.approx(acc)
    assert report.mean_corruption_acc == pytest.approx(sum(report.acc.values()) / 4)
    assert report.clean_acc == pytest.approx(evaluate(model, tiny_data(test_size=64), accelerator="cpu")["test/acc"])
    rows = report.rows()
    assert [r["corruption"] for r in rows] == ["gaussian_noise", "contrast", "mean"]
    assert rows[-1]["s5"] == pytest.approx((report.acc[("gaussian_noise", 5)] + report.acc[("contrast", 5)]) / 2)
    with pytest.raises(UserError, match="unknown corruption"):
        robustness_report(model, dm, ["fog"])


def test_the_robustness_command_writes_the_table_and_tensorboard_scalars(ckpt):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    main(["robustness", *TINY, "--ckpt_path", str(ckpt), "--corruptions", "[pixelate, rotation]",
          "--severities", "[2, 4]", "--subset", "16"])
    run = next(Path("runs").rglob("robustness.md")).parent
    text = (run / "robustness.md").read_text()
    assert "| pixelate |" in text and "| mean |" in text and "16 test images per shifted set" in text
    acc = EventAccumulator(str(run))
    acc.Reload()
    assert [e.step for e in acc.Scalars("robustness/pixelate")] == [2, 4]
    csv_rows = (run / "robustness.csv").read_text().splitlines()
    assert csv_rows[0] == "corruption,s2,s4,mean" and len(csv_rows) == 4
    mean = float(csv_rows[-1].split(",")[-1])
    assert acc.Scalars("robustness/mean_corruption_acc")[0].value == pytest.approx(mean)


def test_the_robustness_command_needs_a_trained_model(capsys):
    with pytest.raises(SystemExit):
        main(["robustness", *TINY])
    assert "lit-ft robustness tests a trained model" in capsys.readouterr().err

"""lit-ft from Python: everything a notebook needs, in one import.

    from lit_ft.notebook import build, plot_schedule, show_predictions, evaluate

    model, dm, trainer = build("configs/quickstart.yaml", {"trainer.max_epochs": 1})
    plot_schedule(model, steps_per_epoch=100, epochs=10)       # LR per group, frozen spans
    trainer.fit(model, datamodule=dm)
    show_predictions(model, dm, n=8)
    evaluate(trainer.checkpoint_callback.best_model_path, dm)  # {"test/acc": ..., ...}

    soup = make_soup(["a.ckpt", "b.ckpt", "c.ckpt"], dm, method="greedy")   # model soup
    wise = wise_ft("a.ckpt", dm, alphas=[0, 0.25, 0.5, 0.75, 1])            # WiSE-FT
    robustness_report(wise.model, dm, subset=2000).table()                  # shifted test sets

Figures are ``matplotlib.figure.Figure`` objects built without pyplot (a notebook displays
the one a cell returns; ``fig.savefig(path)`` writes it). This module only gathers the
public functions of the modules that own them: :mod:`lit_ft.experiment` (build, runs),
:mod:`lit_ft.schedule_plot` (schedules), :mod:`lit_ft.show` (predictions), :mod:`lit_ft.soup`,
:mod:`lit_ft.wise` and :mod:`lit_ft.robustness` (weight averaging and distribution shift).
"""

from lit_ft.data.corruptions import Shift
from lit_ft.experiment import Experiment, build, evaluate, find_checkpoint, load_run, run_datamodule
from lit_ft.robustness import RobustnessReport, robustness_report
from lit_ft.schedule_plot import ScheduleData, draw_schedule, plot_schedule, plot_schedules, schedule_data
from lit_ft.show import show_predictions
from lit_ft.soup import SoupResult, make_soup
from lit_ft.wise import WiseResult, wise_ft

__all__ = [
    "Experiment", "ScheduleData", "build", "draw_schedule", "evaluate", "find_checkpoint", "load_run",
    "plot_schedule", "plot_schedules", "run_datamodule", "schedule_data", "show_predictions",
    "RobustnessReport", "Shift", "SoupResult", "WiseResult", "make_soup", "robustness_report", "wise_ft",
]

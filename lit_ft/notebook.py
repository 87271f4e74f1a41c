"""lit-ft from Python: everything a notebook needs, in one import.

    from lit_ft.notebook import build, plot_schedule, show_predictions, evaluate

    model, dm, trainer = build("configs/quickstart.yaml", {"trainer.max_epochs": 1})
    plot_schedule(model, steps_per_epoch=100, epochs=10)       # LR per group, frozen spans
    trainer.fit(model, datamodule=dm)
    show_predictions(model, dm, n=8)
    evaluate(trainer.checkpoint_callback.best_model_path, dm)  # {"test/acc": ..., ...}

    report = prune(model, ratio=0.5, out="pruned.ckpt", datamodule=dm)  # a smaller copy, measured
    student = ImageClassifier("mobilenetv3_small_050", num_classes=10,
                              distill=Distillation(teacher=best_ckpt, alpha=0.5, temperature=2.0))
    soup = make_soup(["a.ckpt", "b.ckpt", "c.ckpt"], dm, method="greedy")   # model soup
    wise = wise_ft("a.ckpt", dm, alphas=[0, 0.25, 0.5, 0.75, 1])            # WiSE-FT
    robustness_report(wise.model, dm, subset=2000).table()                  # shifted test sets

Figures are ``matplotlib.figure.Figure`` objects built without pyplot (a notebook displays
the one a cell returns; ``fig.savefig(path)`` writes it). This module only gathers the
public functions of the modules that own them: :mod:`lit_ft.experiment` (build, runs),
:mod:`lit_ft.schedule_plot` (schedules), :mod:`lit_ft.show` (predictions, Grad-CAM, reliability),
:mod:`lit_ft.lr_finder` (``lr_find(model, dm).figure()``: the LR finder with every group's ratio kept),
:mod:`lit_ft.prune` and :mod:`lit_ft.distill` (smaller models), :mod:`lit_ft.soup`, :mod:`lit_ft.wise`
and :mod:`lit_ft.robustness` (weight averaging and distribution shift).
"""

from lit_ft.data.corruptions import Shift
from lit_ft.distill import Distillation
from lit_ft.experiment import Experiment, build, evaluate, find_checkpoint, load_run, run_datamodule
from lit_ft.lr_finder import LRFindResult, lr_find
from lit_ft.prune import PruneReport, prune
from lit_ft.robustness import RobustnessReport, robustness_report
from lit_ft.schedule_plot import ScheduleData, draw_schedule, plot_schedule, plot_schedules, schedule_data
from lit_ft.show import reliability_diagram, show_cam, show_predictions
from lit_ft.soup import SoupResult, make_soup
from lit_ft.wise import WiseResult, wise_ft

__all__ = [
    "Distillation", "Experiment", "LRFindResult", "PruneReport", "RobustnessReport", "ScheduleData", "Shift",
    "SoupResult", "WiseResult", "build", "draw_schedule", "evaluate", "find_checkpoint", "load_run", "lr_find",
    "make_soup", "plot_schedule", "plot_schedules", "prune", "reliability_diagram", "robustness_report",
    "run_datamodule", "schedule_data", "show_cam", "show_predictions", "wise_ft",
]

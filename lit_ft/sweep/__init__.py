"""Hyperparameter sweeps over any config key, resumable and parallel: ``lit-ft sweep``.

Optuna samples and prunes (grid, random, TPE; median, successive halving, Hyperband, ...) and
keeps the study in a storage (a journal file in the sweep folder by default, or an RDB URL);
every trial is a ``lit-ft fit`` subprocess with the sampled ``--key=value`` overrides, so every
strategy a config can express (DDP included) is a trial, and its run directory
``runs/<sweep>/trial_<n>/`` is an ordinary lit-ft run.

    lit_ft/sweep/space.py    the search-space file: keys, distributions, conditions (pure)
    lit_ft/sweep/study.py    Optuna study: sampler, resume, budget, stale-trial recovery
    lit_ft/sweep/runner.py   one trial subprocess: command line, cores, log, failure reason
    lit_ft/sweep/report.py   results table, HPARAMS sessions, plots, progress line
    lit_ft/sweep/command.py  ``sweep_command``: the order of things
    lit_ft/callbacks/trial.py  the trial's side: report every epoch, prune all ranks together

Optuna is an optional dependency (``pip install 'lit-ft[sweep]'``): it is imported only when
a sweep runs, so ``lit-ft --help`` works without it.
"""

from lit_ft.sweep.command import sweep_command

__all__ = ["sweep_command"]

"""Sweeps: the space is checked before any trial, trials are `lit-ft fit` subprocesses that
report every epoch, parallel workers share one journal file, a killed sweep resumes, pruning
stops bad trials on every DDP rank, failures are recorded.

The subprocess tests are tiny (test_resnet, 32 px, a few dozen synthetic images, 1-3 epochs) and
marked slow: each trial pays a Python + torch start-up.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
import yaml

from lit_ft.cli import main
from tests.cli_args import synthetic_run
from lit_ft.sweep.space import SearchSpace
from lit_ft.sweep.study import RETRY_OF, REASON, SLOT, THREADS

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    *synthetic_run(train_size=32, val_size=16, test_size=16, trainer={"max_epochs": 1, "log_every_n_steps": 1}),
    # no figures: each trial should cost little more than its start-up
    "--confusion.every_n_epochs", "0", "--train_samples.num_images", "0",
]


@pytest.fixture(autouse=True)
def _trials_import_this_checkout(monkeypatch):
    """Trial subprocesses inherit the environment: make them import this copy of lit_ft, on one thread."""
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def sweep_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "lit_ft", "sweep", *TINY, *args]


def run_sweep(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(sweep_cmd(*args), capture_output=True, text=True, timeout=timeout)
    return proc


def load(name: str, root: Path = Path("runs")) -> optuna.Study:
    from lit_ft.callbacks.trial import open_storage

    return optuna.load_study(study_name=name, storage=open_storage(str(root / name / "study.journal")))


# ---------------------------------------------------------------------------- no trials needed
def test_a_bad_space_key_is_one_clear_error_naming_the_closest_key_before_any_trial(tmp_path, capsys):
    space = write(tmp_path / "s.yaml", "model.optimizer.init_args.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}\n"
                                      "model.layer_decy: {type: float, low: 0.5, high: 1.0}\n")
    with pytest.raises(SystemExit) as exit_:
        main(["sweep", *TINY, "--space", str(space), "--trials", "2"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "key model.layer_decy" in err and "did you mean --model.layer_decay" in err and "Traceback" not in err
    assert not Path("runs").exists()  # nothing ran, nothing was created
    # a bad class in a categorical choice, and a bad option of a chosen class, are caught the same way
    space.write_text("model.freeze: {type: categorical, choices: [lit_ft.schedules.Full, lit_ft.schedules.Gradul]}\n")
    with pytest.raises(SystemExit):
        main(["sweep", *TINY, "--space", str(space), "--trials", "2"])
    assert "did you mean lit_ft.schedules.Gradual" in capsys.readouterr().err
    space.write_text("model.freeze: {type: categorical, choices: {fu: lit_ft.schedules.FreezeUnfreeze}}\n"
                     "model.freeze.init_args.epoch: {type: int, low: 1, high: 2, when: {model.freeze: fu}}\n")
    with pytest.raises(SystemExit):
        main(["sweep", *TINY, "--space", str(space), "--trials", "2"])
    assert "FreezeUnfreeze (model.freeze) has no option 'epoch'" in capsys.readouterr().err


def test_print_space_shows_the_space_and_the_budget(tmp_path, capsys):
    space = write(tmp_path / "s.yaml", "model.optimizer.init_args.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}\n"
                                      "model.freeze:\n  choices: {full: lit_ft.schedules.Full, "
                                      "fu: {class_path: lit_ft.schedules.FreezeUnfreeze, init_args: {epochs: 1}}}\n"
                                      "model.freeze.init_args.epochs: {type: int, low: 1, high: 3, when: {model.freeze: fu}}\n")
    main(["sweep", *TINY, "--space", str(space), "--trials", "7", "--workers", "2", "--print_space", "true"])
    out = capsys.readouterr().out
    assert "float 0.0001 .. 0.01 (log)" in out and "one of full, fu" in out
    assert "int 1 .. 3  when model.freeze in ['fu']" in out
    assert "budget: 7 trials; 2 worker(s)" in out
    assert not Path("runs").exists()


@pytest.mark.parametrize("spec, problem", [
    ("{type: float, low: 1, high: 0.5}", "low (1) must be below high (0.5)"),
    ("{type: float, low: 0, high: 1, log: true}", "a log range needs low > 0"),
    ("{type: flaot, low: 0, high: 1}", "type must be float, int or categorical"),
    ("{type: float, lo: 0, high: 1}", "unknown field(s) ['lo']"),
])
def test_a_malformed_distribution_is_named(spec, problem):
    with pytest.raises(Exception, match=re_escape(problem)):
        SearchSpace.from_mapping(yaml.safe_load(f"model.layer_decay: {spec}"), "s.yaml")


def re_escape(text: str) -> str:
    import re

    return re.escape(text)


def test_a_sampled_trial_passes_class_choices_and_conditional_keys_as_overrides():
    space = SearchSpace.from_mapping(yaml.safe_load(
        "model.freeze:\n  choices: {full: lit_ft.schedules.Full, fu: {class_path: lit_ft.schedules.FreezeUnfreeze}}\n"
        "model.freeze.init_args.epochs: {type: int, low: 1, high: 3, when: {model.freeze: fu}}\n"))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(12):
        trial = study.ask()
        values = space.sample(trial)
        seen.add(trial.params["model.freeze"])
        if trial.params["model.freeze"] == "full":
            assert values == {"model.freeze": "lit_ft.schedules.Full"}  # the condition is not met: no epochs
        else:
            assert values["model.freeze"] == {"class_path": "lit_ft.schedules.FreezeUnfreeze"}
            assert values["model.freeze.init_args.epochs"] in (1, 2, 3)
        study.tell(trial, 0.0)
    assert seen == {"full", "fu"}


# ---------------------------------------------------------------------------- trials
def trial_logs(sweep: Path) -> dict[str, str]:
    return {d.name: (d / "sweep_trial.log").read_text() for d in sorted(sweep.glob("trial_*")) if (d / "sweep_trial.log").is_file()}


@pytest.mark.slow
def test_two_sweep_processes_on_one_journal_run_each_trial_once_and_best_yaml_reproduces_the_best(tmp_path):
    space = write(tmp_path / "s.yaml", "model.optimizer.init_args.lr: {type: float, low: 1.0e-4, high: 3.0e-2, log: true}\n"
                                      "model.label_smoothing: {type: float, low: 0.0, high: 0.2}\n")
    args = ["--space", str(space), "--trials", "6", "--name", "par", "--pruner", "none"]
    # One process with two workers and a second one started on the same study at the same time.
    a = subprocess.Popen(sweep_cmd(*args, "--workers", "2"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(2)
    b = subprocess.Popen(sweep_cmd(*args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out_a, _ = a.communicate(timeout=1200)
    out_b, _ = b.communicate(timeout=1200)
    assert a.returncode == 0 and b.returncode == 0, out_a[-3000:] + out_b[-3000:]
    sweep = Path("runs/par")
    study = load("par")
    run = [t for t in study.trials if not t.user_attrs.get("lit_ft:skipped")]
    assert sorted(t.state.name for t in run) == ["COMPLETE"] * 6  # no trial lost
    assert sorted(int(t.user_attrs[SLOT]) for t in run) == list(range(6))
    logs = trial_logs(sweep)
    assert sorted(logs) == [f"trial_{i}" for i in range(6)]
    assert all(log.count("\n$ ") == 1 for log in logs.values())  # each run directory trained once
    assert len({t.params["model.optimizer.init_args.lr"] for t in run}) == 6  # no duplicated draw
    for t in run:  # each directory holds the trial its study row says
        cfg = yaml.safe_load((sweep / f"trial_{t.user_attrs[SLOT]}" / "config.yaml").read_text())
        assert math.isclose(cfg["model"]["optimizer"]["init_args"]["lr"], t.params["model.optimizer.init_args.lr"])
        assert cfg["test_after_fit"] is False and cfg["trainer"]["logger"]["init_args"]["version"] == f"trial_{t.user_attrs[SLOT]}"
    both = out_a + out_b
    assert "6 of 6 done" in both and "ETA" in both
    # results: table, CSV, HPARAMS sessions, plots
    table = (sweep / "results.md").read_text()
    assert table.count("| COMPLETE |") == 6
    assert len((sweep / "results.csv").read_text().strip().splitlines()) == 7
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for i in range(6):
        acc = EventAccumulator(str(sweep / "hparams" / f"trial_{i}"))
        acc.Reload()
        assert acc.PluginTagToContent("hparams"), i
    assert (sweep / "plots" / "history.png").stat().st_size > 5_000
    # best.yaml is the best trial's complete config: fitting it gives the same validation result
    best = max(run, key=lambda t: t.value)
    cfg = yaml.safe_load((sweep / "best.yaml").read_text())
    assert "callbacks" not in cfg["trainer"] or not cfg["trainer"]["callbacks"]
    assert math.isclose(cfg["model"]["optimizer"]["init_args"]["lr"], best.params["model.optimizer.init_args.lr"])
    threads = int(best.user_attrs[THREADS])
    assert f"OMP_NUM_THREADS={threads} lit-ft fit --config" in (sweep / "best.yaml").read_text()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # bit-exact at the trial's thread count (CI's pytest runs on 2)
    try:
        cli = main(["fit", "--config", str(sweep / "best.yaml")], return_cli=True)
    finally:
        torch.set_num_threads(before)
    assert Path(cli.trainer.log_dir).parent.name == "best"
    assert math.isclose(float(cli.trainer.checkpoint_callback.best_model_score), best.value, abs_tol=1e-6)
    ours = torch.load(cli.trainer.checkpoint_callback.best_model_path, weights_only=True)["state_dict"]
    theirs = torch.load(next((sweep / f"trial_{best.user_attrs[SLOT]}" / "checkpoints").glob("best-*.ckpt")),
                        weights_only=True)["state_dict"]
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def wait_for(predicate, timeout: float = 600, what: str = "") -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def finished_values(study: optuna.Study) -> dict[float, float]:
    return {t.params["model.optimizer.init_args.lr"]: t.value for t in study.trials if t.state.name == "COMPLETE"}


@pytest.mark.slow
def test_a_sweep_killed_mid_trial_and_restarted_ends_with_the_trials_of_one_never_killed(tmp_path):
    space = write(tmp_path / "s.yaml", "model.optimizer.init_args.lr: {type: categorical, choices: [0.001, 0.003, 0.01]}\n")
    longer = ["--data.train_size", "128", "--trainer.max_epochs", "4", "--pruner", "none", "--sampler", "grid", "--seed", "0",
              "--space", str(space)]
    assert run_sweep(*longer, "--name", "calm").returncode == 0
    calm = finished_values(load("calm"))
    assert len(calm) == 3

    def sweep_until_epoch_0_of(slot: int, sig: int) -> None:
        proc = subprocess.Popen(sweep_cmd(*longer, "--name", "killed"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        log = Path(f"runs/killed/trial_{slot}/sweep_trial.log")
        wait_for(lambda: log.is_file() and "epoch 0 val/acc" in log.read_text(), what=f"trial {slot} epoch 0")
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == (128 + sig if sig != signal.SIGKILL else -sig), out[-3000:]

    # SIGTERM (or Ctrl-C) during trial 1: the sweep stops its trial with a checkpoint and exits 143
    sweep_until_epoch_0_of(1, signal.SIGTERM)
    study = load("killed")
    first = study.trials[1]
    assert first.state.name == "FAIL" and first.user_attrs[REASON].startswith("interrupted")
    assert Path("runs/killed/trial_1/checkpoints/last.ckpt").is_file()
    # A crash (SIGKILL of the sweep alone) while the re-run of trial 1 trains: its trial notices
    # and saves; the next start finds it RUNNING with a dead sweep and re-runs it again.
    proc = subprocess.Popen(sweep_cmd(*longer, "--name", "killed"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = Path("runs/killed/trial_1/sweep_trial.log")
    wait_for(lambda: log.read_text().count("reported (rank 0)") >= 2, what="the re-run of trial 1 to report")
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    done = run_sweep(*longer, "--name", "killed")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "left RUNNING by a sweep that stopped" in done.stdout
    study = load("killed")
    killed = finished_values(study)
    assert set(killed) == set(calm)  # the same finished trials ...
    for lr, value in calm.items():  # ... and, resumed from their checkpoints, the same results
        assert math.isclose(killed[lr], value, abs_tol=1e-6), (lr, killed[lr], value)
    retries = [t for t in study.trials if RETRY_OF in t.user_attrs]
    assert len(retries) == 2 and all(t.params == study.trials[1].params for t in retries)
    assert {int(t.user_attrs[SLOT]) for t in retries} == {1}
    table = (Path("runs/killed") / "results.md").read_text()
    assert table.count("| COMPLETE |") == 3 and "(3 attempts)" in table


@pytest.mark.slow
def test_pruning_stops_a_trial_whose_metric_is_worse_and_its_directory_says_so(tmp_path):
    good = write(tmp_path / "good.yaml", "model.optimizer.init_args.lr: {type: float, low: 0.002, high: 0.004}\n")
    bad = write(tmp_path / "bad.yaml", "model.optimizer.init_args.lr: {type: float, low: 1.0e-9, high: 2.0e-9}\n")
    common = ["--name", "pr", "--metric", "val/loss", "--direction", "minimize", "--pruner", "median",
              "--pruner_args", "{n_startup_trials: 1, n_warmup_steps: 0}", "--data.train_size", "64", "--trainer.max_epochs", "3"]
    assert run_sweep("--space", str(good), "--trials", "1", *common).returncode == 0
    proc = run_sweep("--space", str(bad), "--trials", "2", *common)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    study = load("pr")
    kept, pruned = study.trials
    assert kept.state.name == "COMPLETE" and sorted(kept.intermediate_values) == [0, 1, 2]
    assert pruned.state.name == "PRUNED" and sorted(pruned.intermediate_values) == [0]
    assert pruned.intermediate_values[0] > kept.intermediate_values[0]
    trial_dir = Path("runs/pr/trial_1")
    status = yaml.safe_load((trial_dir / "sweep_trial.yaml").read_text())
    assert status["state"] == "PRUNED" and "pruned by MedianPruner after epoch 0" in status["note"]
    assert torch.load(trial_dir / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 0  # stopped after 1 of 3
    assert "| PRUNED |" in Path("runs/pr/results.md").read_text()
    assert "pruning stopped 1 of 2 trials early" in Path("runs/pr/results.md").read_text()


@pytest.mark.slow
def test_a_ddp_trial_reports_once_and_is_pruned_on_both_ranks_together(tmp_path):
    space = write(tmp_path / "s.yaml", "model.optimizer.init_args.lr: {type: float, low: 0.002, high: 0.004}\n")
    proc = run_sweep("--space", str(space), "--trials", "1", "--name", "ddp", "--trainer.devices", "2",
                     "--trainer.strategy", "ddp", "--data.train_size", "64", "--trainer.max_epochs", "3",
                     "--pruner", "threshold", "--pruner_args", "{lower: 1.1}")  # val/acc < 1.1: prune at the first report
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (trial,) = load("ddp").trials
    assert trial.state.name == "PRUNED" and list(trial.intermediate_values) == [0]
    log = Path("runs/ddp/trial_0/sweep_trial.log").read_text()
    assert log.count("reported (rank 0)") == 1  # one report per epoch, from rank 0 only
    assert "epoch 0 val/acc" in log and "pruned by ThresholdPruner, stopping" in log
    assert "rank 1 stops with rank 0 at epoch 0" in log
    ckpt = torch.load("runs/ddp/trial_0/checkpoints/last.ckpt", weights_only=True)
    assert ckpt["epoch"] == 0 and ckpt["global_step"] == 2  # 64 images / 2 ranks / batch 16: one epoch


@pytest.mark.slow
def test_failed_trials_are_recorded_with_their_reason_and_an_all_failing_space_stops(tmp_path, capsys):
    space = write(tmp_path / "s.yaml", "model.layer_decay: {type: float, low: 1.5, high: 2.0}\n")
    with pytest.raises(SystemExit) as exit_:
        main(["sweep", *TINY, "--space", str(space), "--trials", "5", "--max_failures", "2", "--name", "bad"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "all 2 trials failed" in err and "layer_decay must be in (0, 1]" in err
    study = load("bad")
    assert [t.state.name for t in study.trials] == ["FAIL", "FAIL"]
    assert all("layer_decay must be in (0, 1]" in t.user_attrs[REASON] for t in study.trials)
    assert Path("runs/bad/results.md").read_text().count("| FAIL |") == 2


@pytest.mark.parametrize("space", sorted((ROOT / "configs" / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_search_space_checks_against_its_recipe(space, capsys):
    base = [ROOT / "configs/experiments/_base.yaml", ROOT / "configs/experiments/full_ft.yaml"]
    main(["sweep", *(a for c in base for a in ("-c", str(c))), "--space", str(space), "--trials", "16", "--print_space", "true"])
    assert "budget: 16 trials" in capsys.readouterr().out


# ---------------------------------------------------------------------------- pieces, in process
def test_a_trial_left_running_by_a_dead_sweep_is_closed_and_re_enqueued_with_its_parameters(tmp_path):
    # RDB storage (sqlite) here; the subprocess tests use the journal file.
    from lit_ft.callbacks.trial import open_storage
    from lit_ft.sweep.study import HOST, PID, Trials

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    storage = open_storage(f"sqlite:///{tmp_path / 'study.db'}")
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    trial = study.ask()
    trial.suggest_float("model.layer_decay", 0.5, 1.0)
    trial.report(0.5, 0)
    for key, value in ((SLOT, 0), (HOST, __import__("socket").gethostname()), (PID, dead.pid)):
        trial.set_user_attr(key, value)
    alive = study.ask()  # started by this (live) process: not stale
    alive.set_user_attr(PID, os.getpid())
    alive.set_user_attr(HOST, __import__("socket").gethostname())
    alive.set_user_attr("lit_ft:heartbeat", time.time())
    messages = Trials(study, storage).recover(grace=600)
    assert len(messages) == 1 and "trial 0" in messages[0]
    old, running, retry = study.trials
    assert old.state.name == "FAIL" and old.user_attrs[REASON].startswith("interrupted")
    assert running.state.name == "RUNNING"
    assert retry.state.name == "WAITING" and retry.user_attrs[RETRY_OF] == 0 and retry.user_attrs[SLOT] == 0
    popped = study.ask()  # the next ask takes the retry, with the same parameters
    assert popped.number == 2 and popped.suggest_float("model.layer_decay", 0.5, 1.0) == old.params["model.layer_decay"]


@pytest.mark.parametrize("pruner, args", [("median", {"n_startup_trials": 1}), ("hyperband", {"min_resource": 1, "max_resource": 4}),
                                          ("successive_halving", {"min_resource": 1})])
def test_the_trial_callback_reports_to_the_storage_and_asks_the_pruner(tmp_path, pruner, args):
    from lit_ft.callbacks.trial import OptunaTrial, open_storage

    url = str(tmp_path / "study.journal")
    study = optuna.create_study(study_name="s", storage=open_storage(url), direction="maximize")
    # Finished trials that reached 0.9 at every epoch, reported as a trial does; enough of them that
    # each Hyperband bracket (chosen by a hash of the trial number) has some to compare with.
    for _ in range(12):
        done = study.ask()
        reporter = OptunaTrial(url, "s", done.number, pruner=pruner, pruner_args=args)
        assert all(reporter.report(epoch, 0.9) == (False, "") for epoch in range(4))
        study.tell(done, 0.9)
    bad = study.ask()
    cb = OptunaTrial(url, "s", bad.number, pruner=pruner, pruner_args=args)
    decisions = [cb.report(epoch, 0.1) for epoch in range(4)]
    stopped = next(epoch for epoch, (prune, _) in enumerate(decisions) if prune)  # pruned at some epoch
    assert type(make(pruner, args)).__name__ in decisions[stopped][1]
    assert study.trials[bad.number].intermediate_values == {e: 0.1 for e in range(4)}  # where the sweep reads them
    good = study.ask()
    ok = OptunaTrial(url, "s", good.number, pruner=pruner, pruner_args=args)
    assert all(ok.report(epoch, 0.95) == (False, "") for epoch in range(4))


def make(name, args):
    from lit_ft.callbacks.trial import make_pruner

    return make_pruner(name, args)


def test_workers_get_disjoint_core_shares():
    from lit_ft.sweep.runner import core_share

    assert [core_share(k, 2, [0, 1, 2, 3]) for k in range(2)] == [[0, 1], [2, 3]]
    assert [core_share(k, 3, [0, 1]) for k in range(3)] == [[0], [1], [0]]  # more workers than cores

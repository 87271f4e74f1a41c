"""``lit-ft <command> --config x.yaml``: the LightningCLI and lit-ft's own commands, nothing else.

Lightning's commands are ``fit``, ``validate``, ``test`` and ``predict``. lit-ft's own
(``VERBS``: export, lr_find, sweep, ...) are functions in the modules that own them, run
through the same parser: the same ``--config`` files (model/data/trainer sections, plus the
command's own options, which a YAML may also set), ``--ckpt_path best|last|file``, one-line
errors with a HINT, and ``--help`` built from the function's signature and docstring.
A command function looks like::

    def export_command(cli: LitFTCLI, format: Literal["timm", "onnx"] = "onnx", out: Optional[str] = None) -> None:
        '''Export a trained model (one line for `lit-ft --help`).

        Args:
            format: ... (shown by `lit-ft export --help`)
        '''

and gets the instantiated model (with the checkpoint's weights when ``--ckpt_path`` is
given), datamodule and trainer as ``cli.model``, ``cli.datamodule``, ``cli.trainer``.
"""

from __future__ import annotations

import importlib
import inspect
import pickle
import re
import sys
import warnings
from argparse import ArgumentError
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import docstring_parser
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import ArgsType, LightningCLI
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.utilities import rank_zero_info

from lit_ft import channels
from lit_ft.callbacks import (
    BudgetCounter,
    ConfusionLogger,
    PlanMonitor,
    PredictionWriter,
    RunRecord,
    TrainSamplesLogger,
    throughput_monitor,
)
from lit_ft.callbacks import ClassReport, GradCAMLogger, ReliabilityLogger
from lit_ft.callbacks.checkpointing import (
    LAST_EPOCH_CHECKPOINT,
    check_checkpoint_fits,
    refuse_code_pickle,
    restore_weights,
    use_atomic_checkpoints,
)
from lit_ft.callbacks.interrupt import GracefulInterrupt
from lit_ft.callbacks.lp_head import LinearProbeHead
from lit_ft.callbacks.nan_guard import NaNGuard
from lit_ft.config_errors import explain_parse_error
from lit_ft.data import BaseImageDataModule
from lit_ft.errors import UserError
from lit_ft.models import ImageClassifier
from lit_ft.schedules import FreezeSchedule
from lit_ft.weights import check_checkpoint_file

CKPT_ALIASES = ("best", "last")
# The data options a checkpoint's preprocessing fills in for validate/test/predict and resume.
DATA_CONFIG_OPTIONS = ("image_size", "mean", "std", "interpolation", "crop_pct", "grayscale_to_rgb")


@dataclass(frozen=True)
class Verb:
    """One of lit-ft's own commands: ``target`` is ``"module:function"`` (imported on use, so
    optional dependencies stay optional); ``instantiate`` False skips building the model,
    data and trainer (commands that only read the config, e.g. a sweep of subprocesses)."""

    target: str
    instantiate: bool = True

    def function(self) -> Callable[..., Any]:
        module, name = self.target.split(":")
        return getattr(importlib.import_module(module), name)


# lit-ft's own commands, beside Lightning's fit/validate/test/predict.
VERBS: dict[str, Verb] = {
    "export": Verb("lit_ft.export:export_command"),
    "calibrate": Verb("lit_ft.calibration:calibrate_command"),
    "prune": Verb("lit_ft.prune:prune_command"),
    "lr_find": Verb("lit_ft.lr_finder:lr_find_command"),
    "sweep": Verb("lit_ft.sweep:sweep_command", instantiate=False),
    "soup": Verb("lit_ft.soup:soup_command"),
    "wise": Verb("lit_ft.wise:wise_command"),
    "robustness": Verb("lit_ft.robustness:robustness_command"),
}


class LitFTCLI(LightningCLI):
    """LightningCLI with lit-ft's defaults: classes flow from data to model, checkpoints
    (best + last), TensorBoard under ``runs/<experiment>/version_N``, ``--ckpt_path best|last``
    that works in a new process, and a CSV writer for ``predict``."""

    def __init__(self, *args: Any, verb: Optional[tuple[str, Verb]] = None, **kwargs: Any) -> None:
        self.verb = verb
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        if self.verb is not None:
            name, verb = self.verb
            parser.add_argument(
                "--ckpt_path", type=Optional[str], default=None,
                help="checkpoint: best or last (of the newest run of this config), or a .ckpt file",
            )
            # A run's saved config.yaml has this key from `fit`; lit-ft's commands always read
            # checkpoints with weights_only=True, so it is accepted and ignored.
            parser.add_argument("--weights_only", type=Optional[bool], default=None, help="ignored (always true)")
            fn = verb.function()
            # A list of strings (e.g. soup's checkpoints) is typed as on a shell: --ckpt a.ckpt b.ckpt.
            lists = [p for p in inspect.signature(fn).parameters.values() if str(p.annotation).startswith("list[str]")]
            parser.add_function_arguments(fn, nested_key=None, skip={"cli", *(p.name for p in lists)})
            docs = {d.arg_name: d.description for d in docstring_parser.parse(inspect.getdoc(fn) or "").params}
            for p in lists:
                required = p.default is inspect.Parameter.empty
                parser.add_argument(f"--{p.name}", type=str, nargs="+", required=required,
                                    default=None if required else p.default, help=docs.get(p.name))
        parser.link_arguments("data", "model.num_classes", compute_fn=_num_classes, apply_on="instantiate")
        parser.link_arguments("data", "model.class_names", compute_fn=_class_names, apply_on="instantiate")
        # Two stock ModelCheckpoints in one folder: the best epoch, and last.ckpt = the latest epoch
        # (Lightning 2.6's save_last would keep last.ckpt = the best one). Listed in this order, so
        # trainer.checkpoint_callback (and Lightning's ckpt_path="best") is the best one.
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/acc",
                "checkpoint.mode": "max",
                "checkpoint.filename": "best-epoch{epoch:02d}-acc{val/acc:.4f}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        parser.add_lightning_class_args(ModelCheckpoint, "last_checkpoint")  # save_top_k: 0 turns it off
        parser.set_defaults({f"last_checkpoint.{k}": v for k, v in LAST_EPOCH_CHECKPOINT.items()})
        parser.link_arguments("checkpoint.dirpath", "last_checkpoint.dirpath")  # one folder for both
        parser.add_lightning_class_args(PredictionWriter, "prediction_writer")
        # TensorBoard inspection, each configurable (and switched off) from YAML, e.g.
        # `confusion: {every_n_epochs: 0}`, `train_samples: {num_images: 0}`, `throughput: {enabled: false}`.
        parser.add_lightning_class_args(ConfusionLogger, "confusion")
        parser.add_lightning_class_args(TrainSamplesLogger, "train_samples")
        parser.add_lightning_class_args(throughput_monitor, "throughput")  # Lightning's ThroughputMonitor
        parser.add_lightning_class_args(BudgetCounter, "budget")  # budget/images_seen, budget/train_seconds
        parser.add_lightning_class_args(PlanMonitor, "plan_monitor")  # lr/<group>, trainable_params
        # Can I trust it? `reliability: {every_n_epochs: 0}`, `per_class: {on_test: false}`,
        # `cam: {target_layer: layer3, on_test: true, predict_dir: cams/}`.
        parser.add_lightning_class_args(ReliabilityLogger, "reliability")
        parser.add_lightning_class_args(ClassReport, "per_class")
        parser.add_lightning_class_args(GradCAMLogger, "cam")
        parser.add_argument(
            "--test_after_fit", type=bool, default=False, help="after fit, test the best checkpoint on the test split"
        )
        parser.add_argument(
            "--calibrate_after_fit", type=bool, default=False,
            help="after fit, fit a temperature on the validation split and store it in the best checkpoint "
            "(as `lit-ft calibrate`; test_after_fit then reports calibrated numbers)",
        )
        # Reliability: stop on a NaN/Inf loss; save a resumable last.ckpt on SIGTERM/Ctrl-C.
        parser.add_lightning_class_args(NaNGuard, "nan_guard")
        parser.add_lightning_class_args(GracefulInterrupt, "interrupt")
        # The head of a head-only (LP) phase, kept in checkpoints for WiSE-FT (lit-ft wise).
        parser.add_lightning_class_args(LinearProbeHead, "lp_head")

    # -- errors: one message, no usage dump -------------------------------------------------
    def init_parser(self, **kwargs: Any):
        kwargs.setdefault("exit_on_error", False)  # raise, so parse_arguments can explain the error
        return super().init_parser(**kwargs)

    def parse_arguments(self, parser, args: ArgsType) -> None:
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:
            words = list(args) if isinstance(args, (list, tuple)) else sys.argv[1:]
            sub = next((w for w in words if w in self.subcommands()), None)
            sub_parser = getattr(self, "_subcommand_parsers", {}).get(sub, parser)
            raise explain_parse_error(str(err), sub_parser, sub) from None

    def instantiate_trainer(self, **kwargs: Any):
        cfg = self.config_init[self.subcommand] if self.subcommand else self.config_init
        strategy = kwargs.get("strategy", (cfg.get("trainer") or {}).get("strategy", "auto"))
        phases = isinstance(getattr(self.model, "freeze", None), FreezeSchedule) and (
            self.model.freeze.ever_trainable() != self.model.freeze.trainable(0, 0)
        )
        trainer_cfg = cfg.get("trainer") or {}
        callbacks = list(trainer_cfg.get("callbacks") or [])  # Lightning extends this list in place
        trainer = super().instantiate_trainer(**kwargs)
        # Groups frozen for part of the run send no gradient then: DDP must not wait for them.
        # "ddp"-like names get their find_unused twin; "auto" only if it chose DDP (several
        # devices or nodes), since one process needs no DDP at all.
        unused = f"{'ddp' if strategy == 'auto' else strategy}_find_unused_parameters_true"
        if phases and isinstance(strategy, str) and unused in StrategyRegistry and (
            strategy != "auto" or type(trainer.strategy) is DDPStrategy
        ):
            rank_zero_info(f"lit-ft: the freeze plan changes mid-run; strategy {strategy} -> {unused}")
            if "callbacks" in trainer_cfg:
                trainer_cfg["callbacks"] = callbacks
            trainer = super().instantiate_trainer(**{**kwargs, "strategy": unused})
        use_atomic_checkpoints(trainer)  # a crash while saving never corrupts last.ckpt
        return trainer

    def instantiate_classes(self) -> None:
        if self.verb is not None and not self.verb[1].instantiate:
            return  # e.g. a sweep: it only needs the parsed config
        super().instantiate_classes()
        if getattr(self, "trained_from", None) is not None and hasattr(self.model, "hparams"):
            self.model.hparams["pretrained"] = self.trained_from
        ckpt = self.config.get("ckpt_path") if self.verb is not None else None
        if ckpt:
            check_checkpoint_fits(ckpt, self.model)
            restore_weights(self.model, ckpt)

    def run_verb(self) -> None:
        """Call the chosen lit-ft command with its options from the parsed config."""
        name, verb = self.verb
        fn = verb.function()
        params = [p for p in inspect.signature(fn).parameters if p != "cli"]
        fn(self, **{p: self.config[p] for p in params if p in self.config})

    # A checkpoint of other classes/shapes: say so in the user's terms, not as a load_state_dict trace.
    def before_fit(self) -> None:
        self._check_ckpt_fits()

    def before_validate(self) -> None:
        self._check_ckpt_fits()

    def before_test(self) -> None:
        self._check_ckpt_fits()

    def before_predict(self) -> None:
        self._check_ckpt_fits()

    def _check_ckpt_fits(self) -> None:
        ckpt = self.config[self.subcommand].get("ckpt_path")
        if ckpt:
            check_checkpoint_fits(ckpt, self.model)

    # -- checkpoints: aliases, hparams, and no re-download of pretrained weights ------------
    def _parse_ckpt_path(self) -> None:
        sub = self.config.get("subcommand")
        if not sub and self.verb is None:
            return
        cfg = self.config[sub] if sub else self.config
        ckpt = cfg.get("ckpt_path")
        if not ckpt:
            return
        if ckpt in CKPT_ALIASES:
            path, version = resolve_ckpt_alias(ckpt, cfg)
            cfg["ckpt_path"] = str(path)
            if sub == "fit" and version is not None:
                # Resume into the same run directory so the logs continue where they stopped.
                _set_logger_version(cfg, version)
            ckpt = str(path)
        if not Path(ckpt).is_file():
            raise UserError(f"checkpoint not found: {ckpt}", "pass an existing .ckpt path, or `best`/`last`")
        if sub and cfg.get("weights_only") is None:
            cfg["weights_only"] = True  # a checkpoint from elsewhere must not run code when loaded
        check_checkpoint_file(ckpt)  # an HTML page, a git-lfs pointer, ...: say what it is
        try:
            checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as err:
            raise refuse_code_pickle(ckpt, err) from err
        except Exception as err:
            raise UserError(f"cannot read checkpoint {ckpt}: {str(err).splitlines()[0]}", "is it a complete lit-ft .ckpt?")
        hparams = {k: v for k, v in checkpoint.get("hyper_parameters", {}).items() if not k.startswith("_")}
        names = hparams.pop("class_names", None)
        hparams.pop("num_classes", None)  # link targets: they come from the data
        # The checkpoint holds every weight: do not fetch pretrained ones again (no network needed).
        # A channel-pruned network (lit-ft prune) is rebuilt at its widths from the checkpoint itself.
        pruned = channels.is_pruned(checkpoint.get("state_dict", {}), prefix="model.")
        # ...but the model keeps the record of what the run started from (instantiate_classes puts
        # it back), so a resumed run's checkpoints still name it (soups, WiSE-FT, PEFT read it).
        self.trained_from = hparams.get("pretrained")
        hparams["pretrained"] = ckpt if pruned else False
        data_cfg = cfg.get("data")
        if data_cfg is not None:
            init = data_cfg.get("init_args", data_cfg)
            if names and init.get("class_names") is None and _data_has_no_classes(init):
                init["class_names"] = names
            trained = (checkpoint.get("lit_ft") or {}).get("data_config")
            if trained:
                _use_trained_preprocessing(init, trained, ckpt)
        target = {sub: {"model": hparams}} if sub else {"model": hparams}
        self.config = self.parser.parse_object(target, self.config)

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        logger = cfg.get("trainer", {}).get("logger")
        configs = cfg.get("config") or []
        if isinstance(logger, dict) or hasattr(logger, "init_args"):
            init = logger["init_args"]
            if init.get("name") in (None, "default") and configs:
                init["name"] = Path(str(configs[-1])).stem

    def after_fit(self) -> None:
        cb = self.trainer.checkpoint_callback
        best = getattr(cb, "best_model_path", "") if cb else ""
        score = getattr(cb, "best_model_score", None) if cb else None
        if best:
            metric = f"{cb.monitor}={float(score):.4f}" if score is not None else ""
            record = next((c for c in self.trainer.callbacks if isinstance(c, RunRecord)), None)
            others = record.best_summary(exclude=(cb.monitor,)) if record is not None else ""
            print(f"lit-ft: best checkpoint {best} {metric} {others}".rstrip(), flush=True)
        if self.config[self.subcommand].get("calibrate_after_fit") and best and not self.trainer.interrupted:
            from lit_ft.calibration import calibrate_checkpoint

            restore_weights(self.model, best)
            calibrate_checkpoint(self.model, self.datamodule, self.trainer, best, test=False)
        if self.config[self.subcommand].get("test_after_fit") and not self.trainer.interrupted:
            ckpt = best or None
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt, weights_only=True)


def _num_classes(dm: Any) -> Optional[int]:
    return getattr(dm, "num_classes", None)


def _class_names(dm: Any) -> Optional[list[str]]:
    names = getattr(dm, "class_names", None)
    return list(names) if names is not None else None


def _data_has_no_classes(init: Any) -> bool:
    keys = ("train_dir", "val_dir", "test_dir", "name", "num_classes")
    return not any(init.get(k) for k in keys if k in init) or init.get("predict_dir") is not None


def _set_logger_version(cfg: Any, version: int) -> None:
    logger = cfg.get("trainer", {}).get("logger")
    if isinstance(logger, dict) or hasattr(logger, "init_args"):
        logger["init_args"]["version"] = version


def run_dirs(cfg: Any) -> list[Path]:
    """Version directories of this experiment, newest first.

    A config saved in a run directory (``runs/<exp>/version_N/config.yaml``) belongs to that
    run: its own directory comes first, whatever the logger's name and save_dir say.
    """
    configs = [Path(str(c)) for c in (cfg.get("config") or [])]
    own = [c.parent for c in configs if (c.parent / "checkpoints").is_dir() and re.fullmatch(r"version_\d+", c.parent.name)]
    if own:
        return [own[-1]]
    logger = cfg.get("trainer", {}).get("logger")
    init = logger["init_args"] if (isinstance(logger, dict) or hasattr(logger, "init_args")) else {}
    save_dir = Path(str(init.get("save_dir") or "runs"))
    name = init.get("name")
    configs = cfg.get("config") or []
    if name in (None, "default") and configs:
        name = Path(str(configs[-1])).stem
    root = save_dir / (name or "default")
    dirs = [d for d in root.glob("version_*") if re.fullmatch(r"version_\d+", d.name)]
    return sorted(dirs, key=lambda d: int(d.name.split("_")[1]), reverse=True)


def resolve_ckpt_alias(alias: str, cfg: Any) -> tuple[Path, Optional[int]]:
    """``best``/``last`` -> the checkpoint of the newest run of this experiment that has one."""
    for d in run_dirs(cfg):
        last = d / "checkpoints" / "last.ckpt"
        if not last.is_file():
            continue
        version = int(d.name.split("_")[1])
        if alias == "last":
            return last, version
        state = torch.load(last, map_location="cpu", weights_only=True).get("callbacks", {})
        for key, value in state.items():
            # the monitored one: last_checkpoint's state (no monitor) names last.ckpt as its "best"
            if key.startswith("ModelCheckpoint") and value.get("monitor") and value.get("best_model_path"):
                best = Path(value["best_model_path"])
                if best.is_file():
                    return best, version
        return last, version
    raise UserError(
        f"--ckpt_path {alias}: no checkpoint found for this experiment under {run_dirs_root(cfg)}",
        "run `lit-ft fit` with the same config first, or pass a .ckpt path",
    )


def run_dirs_root(cfg: Any) -> str:
    """The folder searched for this experiment's runs (for messages)."""
    dirs = run_dirs(cfg)
    if dirs:
        return str(dirs[0].parent)
    logger = cfg.get("trainer", {}).get("logger")
    init = logger["init_args"] if (isinstance(logger, dict) or hasattr(logger, "init_args")) else {}
    name = init.get("name")
    configs = cfg.get("config") or []
    if name in (None, "default") and configs:
        name = Path(str(configs[-1])).stem
    return str(Path(str(init.get("save_dir") or "runs")) / (name or "default"))


def main(args: ArgsType = None, *, return_cli: bool = False) -> Optional[LitFTCLI]:
    """Entry point of ``lit-ft`` and ``python -m lit_ft``; callable from tests and notebooks.

    Args:
        args: command-line words (``["fit", "--config", "x.yaml"]``); default ``sys.argv``.
        return_cli: return the :class:`LitFTCLI` (trainer, model, datamodule) instead of None.
    """
    words = list(args) if isinstance(args, (list, tuple)) else (sys.argv[1:] if args is None else None)
    verb = words[0] if words and words[0] in VERBS else None
    try:
        _check_composed_configs(words or [])
        if verb is not None:
            argv, sys.argv = sys.argv, sys.argv[:1]  # the words are passed as args (LightningCLI warns if both)
            try:
                cli = make_cli(words[1:], run=False, verb=(verb, VERBS[verb]))
            finally:
                sys.argv = argv
            cli.run_verb()
        else:
            cli = make_cli(args)
    except SystemExit as exit:
        if words is not None and words[:1] in (["-h"], ["--help"]) and exit.code == 0 and VERBS:
            print("lit-ft's own commands (lit-ft <command> --help for their options):")
            for name, v in VERBS.items():
                doc = inspect.getdoc(v.function()) or ""
                print(f"  {name:<10} {doc.splitlines()[0] if doc else ''}")
        raise
    except Exception as err:
        user_error = _find_user_error(err)
        if user_error is None and isinstance(err, ArgumentError):
            user_error = explain_parse_error(str(err))
        if user_error is None:
            raise
        print(f"lit-ft: error: {user_error}", file=sys.stderr)
        raise SystemExit(2) from None
    return cli if return_cli else None


def make_cli(args: ArgsType = None, run: bool = True, **kwargs: Any) -> LitFTCLI:
    """The :class:`LitFTCLI` with lit-ft's defaults, raising errors instead of exiting.

    ``run=False`` parses ``args`` (no subcommand) and only instantiates the model, datamodule and
    trainer: the notebook API (``lit_ft.notebook.build``) uses exactly the CLI's objects.
    ``kwargs`` go to ``LightningCLI`` (e.g. ``parser_kwargs``).
    """
    return LitFTCLI(
        ImageClassifier,
        BaseImageDataModule,
        subclass_mode_data=True,
        auto_configure_optimizers=False,  # the model owns its optimizer (per-group LRs)
        seed_everything_default=42,
        save_config_callback=RunRecord,  # config.yaml + config text, hparams, best metrics
        save_config_kwargs={"overwrite": True},
        trainer_defaults={
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": "runs", "name": "default", "default_hp_metric": False},
            },
        },
        args=args,
        run=run,
        **kwargs,
    )


def _check_composed_configs(words: list[str]) -> None:
    """A strategy config that builds on a ``_base.yaml`` beside it needs that base first.

    Raises:
        UserError: the base was not given, naming the command that works.
    """
    configs = [Path(words[i + 1]) for i, w in enumerate(words[:-1]) if w in ("-c", "--config")]
    configs += [Path(w.split("=", 1)[1]) for w in words if w.startswith("--config=")]
    given = {c.resolve() for c in configs}
    for c in configs:
        base = c.parent / "_base.yaml"
        if c.name != "_base.yaml" and base.is_file() and base.resolve() not in given:
            raise UserError(
                f"{c} builds on {base}, which was not given",
                f"pass the base first: lit-ft {words[0] if words else 'fit'} -c {base} -c {c}",
            )


def _use_trained_preprocessing(init: Any, trained: dict, ckpt: str) -> None:
    """Fill the data options the user left unset with the preprocessing the model was
    trained with (stored in the checkpoint); warn where an explicit value differs."""
    values = {
        "image_size": int(trained["input_size"][-1]) if trained.get("input_size") else None,
        "mean": list(trained["mean"]) if trained.get("mean") is not None else None,
        "std": list(trained["std"]) if trained.get("std") is not None else None,
        "interpolation": trained.get("interpolation"),
        "crop_pct": trained.get("crop_pct"),
        "grayscale_to_rgb": trained.get("grayscale_to_rgb"),
    }
    for key in DATA_CONFIG_OPTIONS:
        value = values.get(key)
        if value is None or key not in init:
            continue
        given = init.get(key)
        if given is None or (key == "grayscale_to_rgb" and given is True and value is False):
            init[key] = value
        elif (list(given) if isinstance(given, (list, tuple)) else given) != value:
            warnings.warn(
                f"lit-ft: data.{key}={given!r} differs from the {value!r} the model in {ckpt} was trained with; "
                "using yours",
                stacklevel=2,
            )


def _find_user_error(err: BaseException) -> Optional[UserError]:
    """The UserError behind ``err``: jsonargparse and Lightning wrap exceptions raised in our code."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, UserError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


if __name__ == "__main__":
    main()

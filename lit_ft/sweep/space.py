"""A sweep's search space: a YAML file of dotted config keys, each with a distribution.

    # configs/sweeps/example.yaml: keys are the command line's --keys, without the dashes
    model.optimizer.init_args.lr: {type: float, low: 1.0e-4, high: 3.0e-3, log: true}
    model.layer_decay:            {type: float, low: 0.5, high: 1.0, step: 0.1}
    trainer.max_epochs:           {type: int, low: 2, high: 4}
    model.freeze:                 # categorical; a mapping names the choices (labels in tables and plots)
      type: categorical
      choices:
        full: lit_ft.schedules.Full
        freeze_unfreeze: {class_path: lit_ft.schedules.FreezeUnfreeze, init_args: {epochs: 1}}
    model.freeze.init_args.epochs: {type: int, low: 1, high: 2, when: {model.freeze: freeze_unfreeze}}

``type`` is ``float`` (``low``, ``high``, optional ``log`` or ``step``), ``int`` (the same)
or ``categorical`` (``choices``: a list, or a mapping label -> value; a value may be any
config value, also a ``class_path`` mapping). ``when`` makes a key conditional on an earlier
categorical key's label(s): Optuna samples define-by-run, so the key is only sampled (and only
passed to the trial) when the condition holds.

Pure: parsing and checking the file, sampling through an Optuna trial, and turning a trial's
parameters into the ``--key=value`` words of its ``lit-ft fit``. Checking the keys against the
CLI's parser is :mod:`lit_ft.sweep.command`'s job (it has the parser).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence

import yaml

from lit_ft.errors import UserError

Kind = Literal["float", "int", "categorical"]
# Keys the sweep sets itself for every trial (run directory, reporting, testing).
RESERVED = ("config", "ckpt_path", "test_after_fit", "trainer.logger", "trainer.callbacks")
_FIELDS = {"type", "low", "high", "log", "step", "choices", "when"}


@dataclass(frozen=True)
class Param:
    """One key of the space.

    Attributes:
        key: the dotted config key (also the Optuna parameter name).
        kind: ``float``, ``int`` or ``categorical``.
        low, high, log, step: the numeric range.
        labels: categorical: what Optuna sees (str/int/float/bool/None).
        values: categorical: the config value of each label.
        when: conditions ``{earlier categorical key: accepted labels}``.
    """

    key: str
    kind: Kind
    low: Optional[float] = None
    high: Optional[float] = None
    log: bool = False
    step: Optional[float] = None
    labels: tuple = ()
    values: tuple = ()
    when: dict[str, tuple] = field(default_factory=dict)

    def distribution(self) -> Any:
        """The Optuna distribution (for ``--print_space`` and checks)."""
        from optuna import distributions as D

        if self.kind == "float":
            return D.FloatDistribution(self.low, self.high, log=self.log, step=self.step)
        if self.kind == "int":
            return D.IntDistribution(int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return D.CategoricalDistribution(list(self.labels))

    def suggest(self, trial: Any) -> Any:
        """Sample this key through an Optuna trial; returns what Optuna stores (number or label)."""
        if self.kind == "float":
            return trial.suggest_float(self.key, self.low, self.high, log=self.log, step=self.step)
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return trial.suggest_categorical(self.key, list(self.labels))

    def value(self, sampled: Any) -> Any:
        """The config value for what Optuna sampled (a label becomes its value)."""
        if self.kind != "categorical":
            return sampled
        if sampled not in self.labels:
            raise UserError(f"{self.key}: {sampled!r} is not one of the choices {list(self.labels)}",
                            "the space changed since this trial was sampled; restore the old choices or start a new sweep (--name)")
        return self.values[self.labels.index(sampled)]

    def candidates(self) -> list[Any]:
        """Config values that must parse: both ends of a range, every choice."""
        if self.kind == "categorical":
            return list(self.values)
        cast = int if self.kind == "int" else float
        return [cast(self.low), cast(self.high)]

    def grid(self) -> list[Any]:
        """Every value for the grid sampler (a range needs ``step``, or is an int range)."""
        if self.kind == "categorical":
            return list(self.labels)
        if self.kind == "int":
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        if self.step is None:
            raise UserError(f"{self.key}: a float range has no grid", f"give it a step (e.g. step: {(self.high - self.low) / 4:g}), "
                            "or use --sampler tpe/random")
        n = int(round((self.high - self.low) / self.step))
        return [round(self.low + i * self.step, 12) for i in range(n + 1)]

    def describe(self) -> str:
        if self.kind == "categorical":
            text = "one of " + ", ".join(str(label) for label in self.labels)
        else:
            text = f"{self.kind} {self.low:g} .. {self.high:g}" + (" (log)" if self.log else "") + (f" step {self.step:g}" if self.step else "")
        if self.when:
            text += "  when " + ", ".join(f"{k} in {list(v)}" for k, v in self.when.items())
        return text


@dataclass
class SearchSpace:
    """The keys of a sweep, in file order (a ``when`` key after the key it depends on)."""

    params: list[Param]
    source: str = "<space>"

    @classmethod
    def load(cls, path: str | Path) -> "SearchSpace":
        path = Path(path)
        if not path.is_file():
            raise UserError(f"search space file {path} does not exist", "pass --space with a YAML file of key: distribution")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise UserError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from err
        return cls.from_mapping(data or {}, str(path))

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], source: str = "<space>") -> "SearchSpace":
        if not isinstance(data, Mapping) or not data:
            raise UserError(f"{source}: the search space is empty", "write one `dotted.config.key: {type: ..., ...}` per line")
        params: list[Param] = []
        for key, spec in data.items():
            params.append(_param(str(key), spec, params, source))
        return cls(params, source)

    # ------------------------------------------------------------------ sampling
    def sample(self, trial: Any) -> dict[str, Any]:
        """Sample every key whose conditions hold (define-by-run); ``{key: config value}``."""
        labels: dict[str, Any] = {}
        for p in self.params:
            if all(labels.get(k, _MISSING) in accepted for k, accepted in p.when.items()):
                labels[p.key] = p.suggest(trial)
        return {k: self.param(k).value(v) for k, v in labels.items()}

    def values(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """A finished trial's Optuna parameters -> ``{key: config value}``, in space order."""
        return {p.key: p.value(params[p.key]) for p in self.params if p.key in params}

    def param(self, key: str) -> Param:
        return next(p for p in self.params if p.key == key)

    def grid(self) -> dict[str, list]:
        """The grid sampler's search space (no conditional keys)."""
        if self.has_conditions:
            raise UserError(f"{self.source}: --sampler grid cannot sample conditional keys (`when`)",
                            "drop `when`, or use --sampler tpe / random")
        return {p.key: p.grid() for p in self.params}

    @property
    def has_conditions(self) -> bool:
        return any(p.when for p in self.params)

    def grid_size(self) -> int:
        return math.prod(len(v) for v in self.grid().values())

    def describe(self) -> str:
        width = max(len(p.key) for p in self.params)
        return "\n".join(f"  {p.key:<{width}}  {p.describe()}" for p in self.params)


_MISSING = object()


def override(key: str, value: Any) -> str:
    """``--key=value`` as the CLI reads it: strings as typed, anything else as JSON (YAML)."""
    text = value if isinstance(value, str) else json.dumps(value)
    return f"--{key}={text}"


def label_of(value: Any) -> Any:
    """A categorical choice given as a list item -> the label Optuna stores (and plots)."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, Mapping) and "class_path" in value:
        args = value.get("init_args") or {}
        inner = ", ".join(f"{k}={v}" for k, v in args.items())
        return f"{str(value['class_path']).rsplit('.', 1)[-1]}({inner})"
    return json.dumps(value, sort_keys=True)


def _param(key: str, spec: Any, earlier: Sequence[Param], source: str) -> Param:
    where = f"{source}: {key}"
    if any(key == r or key.startswith(r + ".") for r in RESERVED):
        raise UserError(f"{where}: the sweep sets {key} itself for every trial", "leave it out of the space")
    if not isinstance(spec, Mapping):
        raise UserError(f"{where}: expected a mapping like {{type: float, low: 0.001, high: 0.1}}, got {spec!r}")
    unknown = sorted(set(spec) - _FIELDS)
    if unknown:
        raise UserError(f"{where}: unknown field(s) {unknown}", f"a key takes {sorted(_FIELDS)}")
    kind = spec.get("type") or ("categorical" if "choices" in spec else None)
    when = _conditions(where, spec.get("when"), earlier)
    if kind == "categorical":
        choices = spec.get("choices")
        if isinstance(choices, Mapping):
            labels, values = tuple(str(k) for k in choices), tuple(choices.values())
        elif isinstance(choices, list) and choices:
            labels, values = tuple(label_of(v) for v in choices), tuple(choices)
        else:
            raise UserError(f"{where}: categorical needs `choices`: a list, or a mapping label -> value")
        if len(set(labels)) != len(labels):
            raise UserError(f"{where}: two choices have the same label {list(labels)}", "name them with a mapping label -> value")
        return Param(key, "categorical", labels=labels, values=values, when=when)
    if kind not in ("float", "int"):
        raise UserError(f"{where}: type must be float, int or categorical, got {kind!r}")
    try:
        low, high = float(spec["low"]), float(spec["high"])
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{where}: a {kind} range needs numbers `low` and `high`", "e.g. {type: float, low: 0.001, high: 0.1, log: true}") from None
    log, step = bool(spec.get("log", False)), spec.get("step")
    if not low < high:
        raise UserError(f"{where}: low ({low:g}) must be below high ({high:g})")
    if log and low <= 0:
        raise UserError(f"{where}: a log range needs low > 0, got {low:g}")
    if log and step is not None:
        raise UserError(f"{where}: log and step together are not supported (by Optuna)", "drop one of them")
    if kind == "int" and (low != int(low) or high != int(high)):
        raise UserError(f"{where}: an int range needs whole numbers, got {low:g} .. {high:g}")
    return Param(key, kind, low, high, log, float(step) if step is not None else None, when=when)


def _conditions(where: str, when: Any, earlier: Sequence[Param]) -> dict[str, tuple]:
    if when is None:
        return {}
    if not isinstance(when, Mapping) or not when:
        raise UserError(f"{where}: `when` must map an earlier categorical key to its label(s)",
                        "e.g. when: {model.freeze: freeze_unfreeze}")
    out = {}
    known = {p.key: p for p in earlier}
    for key, accepted in when.items():
        parent = known.get(key)
        if parent is None or parent.kind != "categorical":
            raise UserError(f"{where}: `when` refers to {key!r}, which is not an earlier categorical key of the space",
                            "list the key it depends on first, as a categorical")
        accepted = tuple(accepted) if isinstance(accepted, list) else (accepted,)
        bad = [a for a in accepted if a not in parent.labels]
        if bad:
            raise UserError(f"{where}: `when` {key} = {bad} is not one of its choices {list(parent.labels)}")
        out[key] = accepted
    return out

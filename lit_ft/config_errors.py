"""jsonargparse's parse errors, rewritten as one :class:`UserError` naming the key and the fix.

jsonargparse reports an unknown option or a value of the wrong type with the full usage text
(a hundred lines for ``lit-ft fit``) followed by a nested dump of every union member it tried.
:func:`explain_parse_error` keeps the useful part: which key, what was expected, what was given,
and the closest valid names (difflib). A YAML syntax error becomes the file, line, column,
PyYAML's problem and the offending line (:func:`install_yaml_file_names` makes jsonargparse's
YAML loader name the file). This module only reads error texts and the parser's option names;
it never changes how a valid config parses.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import re
from typing import Any, Iterable, Optional

from lit_ft.errors import UserError


def explain_parse_error(message: str, parser: Any = None, subcommand: Optional[str] = None) -> UserError:
    """A :class:`UserError` for jsonargparse error ``message``.

    Args:
        message: the ``ArgumentError`` text.
        parser: the (sub)command parser, whose option names feed the "did you mean" hints.
        subcommand: ``fit``/``validate``/..., for the ``--help`` hint.
    """
    help_hint = f"see `lit-ft {subcommand or '<subcommand>'} --help` for every option"
    message = message.strip()

    m = re.match(r"argument subcommand: invalid choice: '([^']*)' \(choose from (.*)\)", message)
    if m:
        choices = re.findall(r"'([^']+)'", m.group(2))
        return UserError(f"unknown subcommand {m.group(1)!r}", f"use one of {', '.join(choices)}{_did_you_mean(m.group(1), choices)}")

    m = re.match(r"unrecognized arguments: (.*)", message, re.S)
    if m:
        words = m.group(1).split()
        option = next((w for w in words if w.startswith("-")), words[0] if words else "")
        key = option.lstrip("-").split("=", 1)[0]
        return UserError(f"unknown option {option.split('=', 1)[0]}", _suggest(key, _keys(parser), "--") + _lr(key) + help_hint)

    m = re.search(r"does not accept (?:nested key|option) '([^']+)'", message)
    if m:
        key = m.group(1)
        return UserError(f"unknown config key {key!r}", _suggest(key, _keys(parser), "") + _lr(key) + help_hint)

    m = re.search(r"Problems parsing config(?: '[^']*')?: (.*)", message, re.S)
    if m:
        return _explain_yaml(m.group(1))

    m = re.match(r'Parser key "([^"]+)":\s*(.*)', message, re.S)
    if m:
        return _explain_value(m.group(1), m.group(2), help_hint)

    first = message.splitlines()[0] if message else "invalid arguments"
    return UserError(first, help_hint)


def _explain_value(key: str, detail: str, help_hint: str) -> UserError:
    if key == "config":
        m = re.search(r"File does not exist: '?([^'\n]+)'?", detail)
        if m:
            return UserError(f"config file {m.group(1)} does not exist", "check the path given to -c/--config")

    m = re.search(r"Option '([^']+)' is not accepted", detail)
    if m:
        option = m.group(1)
        cls_path = _last(re.findall(r"class_path[ =]'([^']+)'", detail))
        params = _init_params(cls_path) if cls_path else []
        owner = f"{cls_path.rsplit('.', 1)[-1]} ({key})" if cls_path else key
        return UserError(f"{owner} has no option {option!r}", _suggest(option, params, f"{key}.") + help_hint)

    m = re.search(r"module '([^']+)' has no attribute '([^']+)'", detail)
    if m:
        module, name = m.groups()
        return UserError(
            f"{key}: there is no {name!r} in {module}",
            _suggest(name, _public_names(module), f"{module}.") + "give the full import path of a class, e.g. lit_ft.schedules.Gradual",
        )

    given = _given(detail)
    m = re.search(r"Expected a typing\.Literal\[(.*?)\]", detail)
    if m:
        choices = re.findall(r"'([^']*)'", m.group(1))
        return UserError(f"{key}: {given!r} is not one of {', '.join(choices)}", "use one of them" + _did_you_mean(given, choices))

    m = re.search(r"Not of type (\w+): (?:could not convert string to \w+: '([^']*)'|(\S+) does not conform)", detail)
    if m and m.group(1) in _RESTRICTED:
        given = m.group(2) if m.group(2) is not None else m.group(3)
        return UserError(f"{key}: expected {_RESTRICTED[m.group(1)]}, got {given!r}", f"give {key} such a value; " + help_hint)

    types = _expected_types(detail)
    if types:
        return UserError(f"{key}: expected {' or '.join(types)}, got {given!r}", f"give {key} a value of that type; " + help_hint)

    lines = [ln.strip(" -") for ln in detail.splitlines() if ln.strip(" -")]
    return UserError(f"invalid value for {key}: {lines[0] if lines else detail}", help_hint)


# --------------------------------------------------------------------------- YAML syntax

_MARK = re.compile(r'^\s*in "([^"]*)", line (\d+), column (\d+)')


def _explain_yaml(detail: str) -> UserError:
    """``config.yaml, line 3, column 1: found a tab character ...`` from a PyYAML error text.

    PyYAML's message is ``[context]\\n  in "<file>", line L, column C\\n<problem>\\n  in ...``;
    jsonargparse keeps it but used to lose it here (only its first line was shown), and it
    parses the file's *text*, so the file reads ``<unicode string>`` unless
    :func:`install_yaml_file_names` is in effect.
    """
    texts: list[tuple[str, Optional[tuple[str, int, int]]]] = []  # (text, its mark)
    for line in detail.strip().splitlines():
        mark = _MARK.match(line)
        if mark and texts and texts[-1][1] is None:
            texts[-1] = (texts[-1][0], (mark.group(1), int(mark.group(2)), int(mark.group(3))))
        elif line.strip() and not mark:
            texts.append((line.strip().rstrip(":"), None))
    located = [(t, m) for t, m in texts if m is not None]
    if not located:
        first = texts[0][0] if texts else detail.strip()
        return UserError(f"invalid config: {first}", "fix the YAML syntax of the config file")
    problem, (name, line, column) = located[-1]
    where = "config" if name.startswith("<") else f"config file {name}"
    context, lines = "", [line]
    if len(located) > 1:
        ctext, (_, cline, ccol) = located[0]
        context = f" ({ctext} at line {cline}, column {ccol})"
        lines.append(cline)  # a problem found at the end of the file started here
    shown = next((f"; line {n}: {text!r}" for n in lines if (text := _source_line(name, n)) is not None), "")
    if "tab" in problem:
        hint = f"YAML indents with spaces only: replace the tab(s) in line {line} with spaces"
    else:
        hint = (
            f"fix the YAML syntax near line {line}: consistent indentation, one `key: value` per line, "
            "quotes around values that contain ': ' or ' #'"
        )
    return UserError(f"{where}, line {line}, column {column}: {problem}{context}{shown}", hint)


def _source_line(name: str, line: int) -> Optional[str]:
    try:
        with open(name, encoding="utf-8", errors="replace") as f:
            for i, text in enumerate(f, start=1):
                if i == line:
                    return text.rstrip("\r\n")
    except OSError:
        return None
    return None


def install_yaml_file_names() -> None:
    """Make YAML syntax errors in config files name the file.

    jsonargparse reads a ``--config`` file and hands its text to the YAML loader, so PyYAML's
    marks say ``<unicode string>``. jsonargparse passes the file's path to a loader that
    accepts a ``path`` argument (its public ``set_loader``): this wraps the current YAML loader
    in one that puts the path into the error's marks and changes nothing else. Process-wide
    (jsonargparse has one loader per mode), run when this module is imported; idempotent.
    """
    from jsonargparse import get_loader, set_loader
    import yaml

    previous = get_loader("yaml")
    if getattr(previous, "_names_the_file", False):
        return

    def load_naming_the_file(stream: str, path: Any = "") -> Any:
        try:
            return previous(stream)
        except yaml.MarkedYAMLError as err:
            if path:
                # jsonargparse passes the file's base name and runs this inside the file's folder.
                name = os.path.abspath(str(path)) if os.path.isfile(str(path)) else str(path)
                for attr in ("context_mark", "problem_mark"):  # the C loader's marks are read-only
                    m = getattr(err, attr, None)
                    if m is not None:
                        setattr(err, attr, yaml.error.Mark(name, m.index, m.line, m.column, None, None))
            raise

    load_naming_the_file._names_the_file = True  # type: ignore[attr-defined]
    set_loader("yaml", load_naming_the_file, (yaml.YAMLError,))


install_yaml_file_names()


# --------------------------------------------------------------------------- helpers

# jsonargparse's constrained types used in lit-ft signatures, in words.
_RESTRICTED = {
    "PositiveInt": "an integer > 0",
    "NonNegativeInt": "an integer >= 0",
    "PositiveFloat": "a number > 0",
    "NonNegativeFloat": "a number >= 0",
    "ClosedUnitInterval": "a number in [0, 1]",
    "OpenUnitInterval": "a number in (0, 1)",
}


def _keys(parser: Any) -> list[str]:
    actions = getattr(parser, "_option_string_actions", {}) or {}
    return sorted({k.lstrip("-") for k in actions if k.startswith("--")})


def _suggest(word: str, candidates: Iterable[str], prefix: str) -> str:
    """``did you mean ...? `` with up to 3 close names, comparing within the same group first
    (``model.dropout`` ~ ``model.drop_rate``: the shared ``model.`` would make everything close)."""
    candidates = list(candidates)
    head, _, tail = word.rpartition(".")
    same = {c.rpartition(".")[2]: c for c in candidates if c.rpartition(".")[0] == head}
    close = [same[t] for t in difflib.get_close_matches(tail, list(same), n=3, cutoff=0.6)]
    if not close:
        close = difflib.get_close_matches(word, candidates, n=3, cutoff=0.75)
    return f"did you mean {', '.join(prefix + c for c in close)}? " if close else ""


def _lr(key: str) -> str:
    if re.search(r"(^|[._])(lr|learning_rate)$", key) and "optimizer" not in key:
        return "the learning rate is an option of the optimizer: model.optimizer.init_args.lr (--model.optimizer.lr); "
    return ""


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(str(word), choices, n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _init_params(class_path: str) -> list[str]:
    """Constructor parameters of ``class_path``, following ``**kwargs`` into base classes."""
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except Exception:
        return []
    params: list[str] = []
    for klass in getattr(cls, "__mro__", [cls]):
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        try:
            sig = inspect.signature(init)
        except (TypeError, ValueError):
            break
        params += [p.name for p in sig.parameters.values() if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if not any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
            break
    return list(dict.fromkeys(params))


def _public_names(module: str) -> list[str]:
    try:
        return [n for n in dir(importlib.import_module(module)) if not n.startswith("_")]
    except Exception:
        return []


def _given(detail: str) -> str:
    m = re.search(r"Given value: (.*)", detail) or re.search(r"Got value: (.*)", detail)
    return m.group(1).strip() if m else "?"


def _expected_types(detail: str) -> list[str]:
    m = re.search(r"Subtypes: \[(.*?)\]", detail)
    text = m.group(1) if m else " ".join(re.findall(r"Expected a (<class '[^']+'>)", detail))
    names = [n.rsplit(".", 1)[-1] for n in re.findall(r"<class '([^']+)'>", text)]
    return ["None" if n == "NoneType" else n for n in dict.fromkeys(names)]


def _last(items: list[str]) -> Optional[str]:
    return items[-1] if items else None

"""docs/operators.md is checked against the code's signatures, so it cannot drift (issue #17, 6).

The page documents each public class under a heading ``## `ClassName` (`module.path`)`` (or
``###``) followed by a table ``| parameter | default | meaning |`` whose first column names the
parameter(s) in backticks (``a`` / ``b`` for rows sharing a meaning). A section may say that
its class "takes every parameter of `OtherClass`" (a documented subclass), and then only lists
its own. The test is driven by the headings, so a new public class gets checked by adding its
section; ``REQUIRED`` lists the classes that must have one.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from pathlib import Path
from typing import Any

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "operators.md"

#: Public classes that must have a section (extend it with every new public class).
REQUIRED = {
    "FableBatchSubmitOperator": "airflow_provider_fable.operators.submit",
    "FableBatchOperator": "airflow_provider_fable.operators.batch",
    "FableValidateLoadOperator": "airflow_provider_fable.operators.load",
    "FableBatchSensor": "airflow_provider_fable.sensors.batch",
    "FableBatchTrigger": "airflow_provider_fable.triggers.batch",
    "FableHook": "airflow_provider_fable.hooks.fable",
}

HEADING = re.compile(r"^#{2,3} `(?P<cls>\w+)` \(`(?P<module>[\w.]+)`\)\s*$")
ANY_HEADING = re.compile(r"^#{1,6} ")
TABLE_HEADER = re.compile(r"^\|\s*parameter\s*\|\s*default\s*\|\s*meaning\s*\|\s*$")
INHERITS = re.compile(r"every\s+parameter\s+of\s+`(\w+)`")


def sections() -> dict[str, dict[str, Any]]:
    """Class name -> {"module", "rows": {param: default cell}, "inherits": [class names]}."""
    found: dict[str, dict[str, Any]] = {}
    current: dict[str, Any] | None = None
    in_table = False
    for line in DOC.read_text().splitlines():
        match = HEADING.match(line)
        if match or ANY_HEADING.match(line):
            current = None
            in_table = False
            if match:
                assert match["cls"] not in found, f"two sections for {match['cls']}"
                current = found[match["cls"]] = {"module": match["module"], "rows": {}, "text": ""}
            continue
        if current is None:
            continue
        current["text"] += line + "\n"
        if TABLE_HEADER.match(line):
            in_table = True
            continue
        if in_table and line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if set(cells[0]) <= set("-: "):
                continue  # the |---| line
            names = re.findall(r"`(\w+)`", cells[0])
            assert names, f"{line!r}: the first column names no parameter in backticks"
            defaults = [d.strip() for d in cells[1].split(" / ")] if len(cells) > 1 else []
            if len(defaults) != len(names):
                defaults = [cells[1] if len(cells) > 1 else ""] * len(names)
            for name, default in zip(names, defaults, strict=True):
                assert name not in current["rows"], f"{name} documented twice"
                current["rows"][name] = default
        elif in_table:
            in_table = False
    for section in found.values():
        section["inherits"] = INHERITS.findall(section.pop("text"))
    return found


SECTIONS = sections()


def own_parameters(cls: type) -> dict[str, inspect.Parameter]:
    """Keyword parameters of the provider's own ``__init__`` s along the MRO.

    Airflow's base classes (BaseOperator, BaseSensorOperator, BaseTrigger, BaseHook) are left
    out: their arguments are documented by Airflow. A subclass passing ``**kwargs`` on to a
    provider class (FableBatchOperator -> FableBatchSubmitOperator) gets that class's too.
    """
    params: dict[str, inspect.Parameter] = {}
    for klass in cls.__mro__:
        if not klass.__module__.startswith("airflow_provider_fable") or "__init__" not in vars(klass):
            continue
        for name, param in inspect.signature(klass.__init__).parameters.items():
            if name != "self" and param.kind not in (param.VAR_KEYWORD, param.VAR_POSITIONAL):
                params.setdefault(name, param)
    return params


def documented(name: str) -> dict[str, str]:
    """The rows of a section, with those of the sections it inherits."""
    section = SECTIONS[name]
    rows = dict(section["rows"])
    for parent in section["inherits"]:
        assert parent in SECTIONS, f"{name} inherits {parent}, which has no section"
        rows = {**documented(parent), **rows}
    return rows


def load_class(name: str) -> type:
    return getattr(importlib.import_module(SECTIONS[name]["module"]), name)


def test_every_required_public_class_has_a_section():
    missing = {name for name in REQUIRED if name not in SECTIONS}
    assert not missing, f"docs/operators.md has no section for {sorted(missing)}"
    for name, module in REQUIRED.items():
        assert SECTIONS[name]["module"] == module, f"{name}'s heading names {SECTIONS[name]['module']}"


def test_the_page_has_sections_to_check():
    assert len(SECTIONS) >= len(REQUIRED)
    assert all(section["rows"] or section["inherits"] for section in SECTIONS.values()), [
        name for name, s in SECTIONS.items() if not (s["rows"] or s["inherits"])
    ]


@pytest.mark.parametrize("name", sorted(SECTIONS))
def test_every_parameter_is_documented_and_every_row_is_a_parameter(name):
    params = own_parameters(load_class(name))
    rows = documented(name)
    undocumented = sorted(set(params) - set(rows))
    unknown = sorted(set(rows) - set(params))
    assert not undocumented, f"{name}: parameters missing from docs/operators.md: {undocumented}"
    assert not unknown, f"{name}: docs/operators.md rows that are no parameter: {unknown}"


def _literal(cell: str) -> tuple[bool, Any]:
    """(True, value) when the default cell is one Python literal in backticks (optionally
    followed by ``= what it means``); (False, None) for prose, which is not compared."""
    match = re.fullmatch(r"`([^`]+)`(?:\s*=.*)?", cell)
    if not match:
        return False, None
    try:
        return True, ast.literal_eval(match[1])
    except (ValueError, SyntaxError):
        return False, None


@pytest.mark.parametrize("name", sorted(SECTIONS))
def test_documented_defaults_match_the_code(name):
    params = own_parameters(load_class(name))
    wrong = []
    for param, cell in documented(name).items():
        if param not in params:
            continue  # reported by the test above
        default = params[param].default
        if cell == "required":
            if default is not inspect.Parameter.empty:
                wrong.append(f"{param}: documented required, default is {default!r}")
            continue
        if default is inspect.Parameter.empty:
            wrong.append(f"{param}: required in the code, documented default {cell!r}")
            continue
        literal, value = _literal(cell)
        if literal and (value != default or type(value) is not type(default)):
            wrong.append(f"{param}: documented {cell!r}, code default {default!r}")
    assert not wrong, f"{name}: " + "; ".join(wrong)


def test_the_default_model_named_on_the_page_is_the_codes():
    from airflow_provider_fable.core.job import DEFAULT_MODEL

    model_row = SECTIONS["FableBatchSubmitOperator"]["rows"]["model"]
    assert f"`{DEFAULT_MODEL}`" in model_row, model_row

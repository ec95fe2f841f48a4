"""Reading an output model's JSON schema: its top-level properties, wherever pydantic put them.

A model that refers to itself (``children: list["Node"]``) is emitted by pydantic as
``{"$defs": {"Node": {...}}, "$ref": "#/$defs/Node"}``: the top level has no ``properties`` at all.
Code that reads ``schema["properties"]`` directly then sees a model with no fields, derives a
table with only the id and metadata columns and loads every answer as an empty row. Everything
that needs the fields goes through :func:`model_properties` instead.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


def _follow(ref: str, schema: dict[str, Any]) -> dict[str, Any]:
    """The definition a local ``$ref`` (``#/$defs/X`` or ``#/definitions/X``) points at."""
    if not ref.startswith("#/"):
        raise ValueError(f"output schema uses a non-local $ref {ref!r}; only '#/...' refs are supported")
    node: Any = schema
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, dict) or part not in node:
            raise ValueError(f"output schema $ref {ref!r} points at nothing")
        node = node[part]
    if not isinstance(node, dict):
        raise ValueError(f"output schema $ref {ref!r} does not point at a schema object")
    return node


def top_level(schema: dict[str, Any]) -> dict[str, Any]:
    """The object schema the root describes, following a root ``$ref`` (chains included).

    Keys written next to the root ``$ref`` (title, description, ...) win over the target's,
    as in JSON Schema 2020-12 where ``$ref`` is applied alongside its siblings.
    """
    seen: set[str] = set()
    node = schema
    while isinstance(node.get("$ref"), str):
        ref = node["$ref"]
        if ref in seen:
            raise ValueError(f"output schema root $ref {ref!r} refers to itself")
        seen.add(ref)
        target = _follow(ref, schema)
        siblings = {k: v for k, v in node.items() if k not in ("$ref", "$defs", "definitions")}
        node = {**target, **siblings}
    return node


def schema_defs(schema: dict[str, Any]) -> dict[str, Any]:
    """Named definitions of a schema (pydantic v2 ``$defs``; older emitters ``definitions``)."""
    return {**schema.get("definitions", {}), **schema.get("$defs", {})}


def model_properties(output_model: type[BaseModel]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(properties, defs)`` of the output model's top level, by alias, with a root ``$ref`` followed.

    This is what column derivation (``core.sinks.output_columns``), distributions and the
    pre-flight storability check must read instead of ``schema["properties"]``.
    """
    schema = output_model.model_json_schema(by_alias=True)
    return dict(top_level(schema).get("properties", {})), schema_defs(schema)

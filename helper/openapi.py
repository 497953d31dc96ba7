"""Reading docs/openapi.yaml for the tests that hold it to the code and to the running system.

docs/openapi.yaml is written by hand (it is the contract a client developer reads
in Swagger UI at /docs/); tests/unit/test_docs.py checks it on its own and
tests/e2e/test_openapi.py calls every operation it documents. Both walk it the
same way, with these few helpers: operations in file order, local ``$ref``
resolution, and a schema with every ``$ref`` inlined for jsonschema.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import yaml

from .infra import ROOT

DOCS = ROOT / "docs"
OPENAPI = DOCS / "openapi.yaml"
HTTP_METHODS = ("get", "put", "post", "patch", "delete")


def load_spec() -> dict[str, Any]:
    with open(OPENAPI, encoding="utf-8") as fh:
        spec: dict[str, Any] = yaml.safe_load(fh)
    return spec


def resolve(spec: dict[str, Any], node: Any) -> Any:
    """Follow ``$ref`` (local JSON pointers) until a concrete node."""
    seen = 0
    while isinstance(node, dict) and "$ref" in node:
        ref = node["$ref"]
        if not ref.startswith("#/"):
            raise ValueError(f"only local $ref is supported: {ref}")
        target: Any = spec
        for part in ref[2:].split("/"):
            target = target[part.replace("~1", "/").replace("~0", "~")]
        node = target
        seen += 1
        if seen > 20:
            raise ValueError(f"$ref loop at {ref}")
    return node


def deref(spec: dict[str, Any], node: Any, depth: int = 0) -> Any:
    """``node`` with every ``$ref`` replaced by its target: a plain JSON Schema a validator takes as is."""
    if depth > 30:
        raise ValueError("$ref nesting too deep (a recursive schema?)")
    if isinstance(node, dict):
        if "$ref" in node:
            return deref(spec, resolve(spec, node), depth + 1)
        return {k: deref(spec, v, depth + 1) for k, v in node.items()}
    if isinstance(node, list):
        return [deref(spec, v, depth + 1) for v in node]
    return node


@dataclass
class Operation:
    """One documented operation: method, path template and its OpenAPI object."""

    method: str
    path: str
    op: dict[str, Any]

    @property
    def id(self) -> str:
        return str(self.op["operationId"])


def operations(spec: dict[str, Any]) -> Iterator[Operation]:
    """Every operation, in file order."""
    for path, item in spec["paths"].items():
        for method in HTTP_METHODS:
            if method in item:
                yield Operation(method, path, item[method])


def media_example(spec: dict[str, Any], media: dict[str, Any]) -> Any:
    """The example of a media type object (``example``, else the first of ``examples``), or None."""
    if "example" in media:
        return media["example"]
    for ex in media.get("examples", {}).values():
        return resolve(spec, ex).get("value")
    return None

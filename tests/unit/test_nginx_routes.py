"""The routes block of the nginx template is what docs/openapi.yaml says (helper/nginx_routes.py)."""

from __future__ import annotations

import re

from helper.nginx_routes import TEMPLATE, load_spec, render_block, route_methods, update_template


def test_the_template_block_is_generated_from_the_reference() -> None:
    text = TEMPLATE.read_text()
    assert update_template(text, render_block(load_spec())) == text, "run `make docs` (python -m helper.nginx_routes)"


def test_each_documented_path_meets_its_own_route_first() -> None:
    """Nginx takes the first matching regex: a concrete path must not be caught by a templated one."""
    spec = load_spec()
    routes = route_methods(spec)
    assert {p for p, _, _ in routes} == set(spec["paths"])
    for path, _, allow in routes:
        concrete = "/".join("x1" if seg.startswith("{") else seg for seg in path.split("/"))
        first = next(p for p, regex, _ in routes if re.match(regex, concrete))
        assert first == path, f"{concrete} is taken by {first}"
        methods = [m for m in spec["paths"][path] if m in ("get", "put", "post", "delete", "patch")]
        assert {m.strip() for m in allow.split(",")} == {m.upper() for m in methods} | (
            {"HEAD"} if "get" in methods else set()
        )
    assert not any(re.match(regex, "/v1/nope") for _, regex, _ in routes)

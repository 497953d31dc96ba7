"""The routes block of deployment/nginx/nginx.conf.tmpl, generated from docs/openapi.yaml.

Nginx answers a path no route has with 404 and a method a route does not have
with 405 and an ``Allow`` header listing the route's methods (RFC 9110), in the
contract's JSON shape and before the token check. Which routes exist and what
methods they take is the reference's to say, so the block between the markers
in the template is generated from it; the same template serves development
(helper/infra.py) and production (deployment/nginx/render.sh) as it is.

    python -m helper.nginx_routes          # rewrite the block (also `make docs`)
    python -m helper.nginx_routes --check  # exit 1 when the template is stale

tests/unit/test_nginx_routes.py fails when the template and the reference differ.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
OPENAPI = ROOT / "docs" / "openapi.yaml"
TEMPLATE = ROOT / "deployment" / "nginx" / "nginx.conf.tmpl"

BEGIN = (
    "    # BEGIN routes: generated from docs/openapi.yaml by `python -m helper.nginx_routes` (make docs); do not edit"
)
END = "    # END routes"
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
#: $api_route of a path under /v1/ that no route has.
NO_ROUTE = "-"


def route_methods(spec: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(path, nginx regex, Allow value) per documented path, literal paths before templated ones.

    Nginx tries a map's regexes in order and takes the first match, as OpenAPI
    matches concrete paths before templated ones (``/v1/groups/public`` before
    ``/v1/groups/{id}``). A route with GET also takes HEAD.
    """
    out = []
    for path, item in spec["paths"].items():
        methods = [m.upper() for m in METHODS if m in item]
        if "GET" in methods and "HEAD" not in methods:
            methods.insert(methods.index("GET") + 1, "HEAD")
        parts = [
            r"[^/]+" if re.fullmatch(r"\{[^}]+\}", seg) else re.escape(seg).replace("\\-", "-")
            for seg in path.split("/")
        ]
        out.append((path, "^" + "/".join(parts) + "$", ", ".join(methods)))
    out.sort(key=lambda r: (r[0].count("{"), r[0]))
    return out


def render_block(spec: dict[str, Any]) -> str:
    """The block between (and including) the markers."""
    width = max(len(regex) for _, regex, _ in route_methods(spec)) + 4
    lines = [
        BEGIN,
        "    # The methods of each API route, for the 405 and its Allow header; '-': a path under",
        "    # /v1/ that no route has (404); empty: not an API path.",
        "    map $uri $api_route {",
        '        default "";',
    ]
    for _, regex, allow in route_methods(spec):
        key = '"~' + regex + '"'
        lines.append(f'        {key:<{width}} "{allow}";')
    key = '"~^/v1/"'
    lines += [
        f'        {key:<{width}} "{NO_ROUTE}";',
        "    }",
        "    # 1 when the request's method is one its API route lists (or it is no API path).",
        '    map "$request_method $api_route" $api_method_ok {',
        "        default 0;",
        '        "~^[A-Z_-]+ $" 1;',
        '        "~^([A-Z_-]+) (?:.*, )?\\1(?:,|$)" 1;',
        "    }",
        "    # What a 405 lists: the API route's methods, or what the static files take.",
        "    map $api_route $allow_header {",
        '        "" "GET, HEAD";',
        "        default $api_route;",
        "    }",
        END,
    ]
    return "\n".join(lines)


def update_template(text: str, block: str) -> str:
    """``text`` with the block from the line that starts with the BEGIN marker to the END marker replaced."""
    start = text.index(BEGIN.split(":")[0])
    end = text.index(END, start) + len(END)
    return text[:start] + block + text[end:]


def load_spec(path: Path = OPENAPI) -> dict[str, Any]:
    with open(path, encoding="utf-8") as fh:
        spec: dict[str, Any] = yaml.safe_load(fh)
    return spec


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="helper.nginx_routes")
    parser.add_argument("--check", action="store_true", help="exit 1 if the template's block is stale")
    args = parser.parse_args(argv)
    text = TEMPLATE.read_text()
    new = update_template(text, render_block(load_spec()))
    if args.check:
        if new != text:
            print(f"{TEMPLATE.relative_to(ROOT)}: routes block differs from docs/openapi.yaml; run make docs")
            return 1
        return 0
    if new != text:
        TEMPLATE.write_text(new)
        print(f"wrote {TEMPLATE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/bin/sh
# Install the API reference's viewers from npm and put the files the pages
# load under docs/vendor/, which Nginx serves at /docs/vendor/ (DOCS_ROOT):
#   swagger-ui/  Swagger UI (swagger-ui-dist)            for /docs/       (docs/index.html)
#   asyncapi/    the AsyncAPI React component's bundle   for /docs/events (docs/events.html)
# Versions and integrity hashes are pinned in package.json / package-lock.json;
# node_modules/ also keeps @asyncapi/specs, the JSON Schema the docs test
# validates docs/asyncapi.yaml against. Nothing is fetched by a browser from
# outside: the pages load only these copies.
#
# Run by `make setup` (when the lock changes) and by the Nginx image's build.
set -eu
cd "$(dirname "$0")/.."

npm ci --ignore-scripts --no-audit --no-fund --loglevel=error

tmp=docs/vendor.tmp
rm -rf "$tmp"
mkdir -p "$tmp/swagger-ui" "$tmp/asyncapi"
ui=node_modules/swagger-ui-dist
cp "$ui/swagger-ui-bundle.js" "$ui/swagger-ui.css" "$ui/LICENSE" "$ui/NOTICE" "$tmp/swagger-ui/"
aa=node_modules/@asyncapi/react-component
cp "$aa/browser/standalone/index.js" "$aa/styles/default.min.css" "$aa/LICENSE" "$tmp/asyncapi/"
# Readable by Nginx's unprivileged workers whatever the umask.
chmod -R a+rX "$tmp"
rm -rf docs/vendor
mv "$tmp" docs/vendor
touch docs/vendor/.installed

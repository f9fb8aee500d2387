#!/usr/bin/env bash
# Fetches the OHIF v3 viewer's prebuilt dist/ (npm package @ohif/app, pinned) from the npm registry
# into .cache/ohif/<version>/dist (ignored by git, never committed). Idempotent: a stamp makes a
# second run offline and instant. Prints the dist folder.
set -euo pipefail
cd "$(dirname "$0")/.."
OHIF_VERSION="${OHIF_VERSION:-3.13.2}"
dest=".cache/ohif/$OHIF_VERSION"
if [ -f "$dest/.desam-ok" ] && [ -f "$dest/dist/index.html" ]; then
  echo "$PWD/$dest/dist"
  exit 0
fi
if ! command -v npm >/dev/null 2>&1; then
  echo "setup-ohif: npm is not installed (install Node.js with npm): it fetches @ohif/app@$OHIF_VERSION" >&2
  exit 1
fi
rm -rf "$dest" && mkdir -p "$dest"
echo "setup-ohif: fetching @ohif/app@$OHIF_VERSION (about 50 MB) from the npm registry" >&2
( cd "$dest" && npm pack --silent "@ohif/app@$OHIF_VERSION" >/dev/null \
  && tar xzf "ohif-app-$OHIF_VERSION.tgz" --strip-components=1 package/dist \
  && rm -f "ohif-app-$OHIF_VERSION.tgz" )
[ -f "$dest/dist/index.html" ] || { echo "setup-ohif: @ohif/app@$OHIF_VERSION has no dist/index.html" >&2; exit 1; }
touch "$dest/.desam-ok"
echo "$PWD/$dest/dist"

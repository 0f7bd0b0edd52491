#!/usr/bin/env bash
# A non-editable install works: the wheel, installed in an environment of its own (reusing the installed
# dependencies, so it costs seconds), answers SQL from the views and example queries it carries.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
rm -rf build  # setuptools reuses build/lib: a stale copy of atlas/sql there would hide a wheel without it
pip wheel --no-deps --no-build-isolation -q -w "$tmp/dist" .
python -m venv --system-site-packages "$tmp/venv"
"$tmp/venv/bin/pip" install -q --no-deps --ignore-installed "$tmp"/dist/atlas-*.whl
cd "$tmp"  # away from the source tree: only the wheel can answer
venv/bin/python -c 'import atlas, sys; sys.exit(0 if "/venv/" in atlas.__file__ else "atlas imported from " + atlas.__file__)'
venv/bin/atlas queries | grep -q class_selectivity
venv/bin/atlas make-shapes imgs --n 24 --side 32 >/dev/null
venv/bin/atlas build --model zfnet-mini --data imgs --out tiny --image-size 32 --k 2 --no-index --no-progress >/dev/null
venv/bin/atlas sql tiny "SELECT count(*) AS n FROM images" --format csv | grep -qx 24
venv/bin/atlas sql tiny --query layer_summary --format csv | grep -q '^conv5,'
venv/bin/atlas sql tiny --query dead_channels --format csv >/dev/null
venv/bin/atlas help promises | grep -q "Threat model"  # the manual ships in the wheel
echo "wheel smoke test: ok (atlas queries, a view, two named queries and a manual topic from a non-editable install)"

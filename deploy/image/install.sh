#!/bin/sh
# The image's install step, shared by the Dockerfile and the test that
# exercises it without Docker: a virtual environment at $1 with the project
# (from the source tree at $2) and its runtime dependencies, nothing else.
set -eu
venv="$1"
src="$2"
python3 -m venv "$venv"
"$venv/bin/pip" install --no-cache-dir --upgrade pip
"$venv/bin/pip" install --no-cache-dir "$src"
# Fail the build now, not at the first start, if an entry point is broken.
for role in front scheduler http; do
    "$venv/bin/stui-sessions" "$role" --help >/dev/null
done

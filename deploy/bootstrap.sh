#!/usr/bin/env bash
# Build (or reuse) the Python environment for this checkout and link it as .venv.
# The environment lives under ~/.cache/ksr-stream, keyed by a hash of the pinned dependencies
# (pyproject.toml's lists) and the Python version, so a fresh clone reuses it while they are unchanged.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cache=${KSR_CACHE_DIR:-$HOME/.cache/ksr-stream}
python=${PYTHON:-python3}
mkdir -p "$cache"

requirements=$("$python" - "$root/pyproject.toml" <<'PY'
import sys, tomllib
meta = tomllib.load(open(sys.argv[1], "rb"))
deps = meta["project"]["dependencies"] + meta["project"]["optional-dependencies"]["dev"]
print("\n".join(deps + meta["build-system"]["requires"]))
PY
)
key=$( (printf '%s\n' "$requirements"; "$python" -c 'import sys; print(sys.version)') | sha256sum | cut -c1-16)
venv="$cache/venv-$key"

if [ ! -f "$venv/.complete" ]; then
  echo "bootstrap: building $venv (the first run downloads PyTorch, several GB)" >&2
  rm -rf "$venv"
  "$python" -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
  printf '%s\n' "$requirements" > "$venv/requirements.txt"
  "$venv/bin/pip" install -q -r "$venv/requirements.txt"
  touch "$venv/.complete"
fi
# The project itself is installed editable per checkout, so the shared environment always
# imports this clone's code.
if ! "$venv/bin/pip" install -q --no-deps --no-build-isolation -e "$root" >"$venv/editable.log" 2>&1; then
  cat "$venv/editable.log" >&2
  echo "bootstrap: installing the project into $venv failed (log above)" >&2
  exit 1
fi
ln -sfn "$venv" "$root/.venv"
echo "bootstrap: environment ready at $root/.venv" >&2

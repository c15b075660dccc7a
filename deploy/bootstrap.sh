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
# Older bootstraps installed the project editable into the shared environment; that pinned every
# checkout to one clone's code.
if ls "$venv"/lib/python3*/site-packages/__editable__*ksr_stream* >/dev/null 2>&1; then
  "$venv/bin/pip" uninstall -y -q ksr-stream >&2
fi
# Each checkout gets its own tiny environment at .venv that sees the shared dependencies and this
# checkout's code through .pth files, so two clones on one machine never import each other's code.
local="$root/.venv"
if [ -L "$local" ]; then rm -f "$local"; fi
if [ ! -x "$local/bin/python" ]; then
  "$python" -m venv --without-pip "$local"
fi
site=$("$local/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
shared=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# addsitedir (not a plain path line) so the shared folder's own .pth files are honoured too.
printf 'import site; site.addsitedir(%s)\n' "'$shared'" > "$site/_ksr_shared_dependencies.pth"
printf '%s\n' "$root" > "$site/_ksr_checkout.pth"
cat > "$local/bin/ksr" <<PY
#!$local/bin/python
import sys
from worker.cli import main
sys.exit(main())
PY
chmod +x "$local/bin/ksr"
for tool in ruff honcho; do ln -sfn "$venv/bin/$tool" "$local/bin/$tool"; done
echo "bootstrap: environment ready at $local (dependencies: $venv)" >&2

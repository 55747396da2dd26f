# Sourced by scripts/demo and scripts/test: make (or reuse) .venv with mqkit installed editable.
# MQKIT_EXTRAS picks the extras (default: the demo needs none).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${MQKIT_VENV:-$ROOT/.venv}
EXTRAS=${MQKIT_EXTRAS:-}
PYTHON_BIN=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON_BIN" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || { echo "mqkit needs Python >= 3.11 (set PYTHON=/path/to/python3.11)" >&2; exit 1; }
  "$PYTHON_BIN" -m venv "$VENV"
fi
stamp="$VENV/.mqkit-installed"
want="$(cat "$ROOT/pyproject.toml" | sha256sum | cut -c1-16) [$EXTRAS]"
if [ ! -f "$stamp" ] || ! grep -qxF "$want" "$stamp"; then
  spec="$ROOT"
  [ -n "$EXTRAS" ] && spec="$ROOT[$EXTRAS]"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$spec"
  # remember every extras set installed so switching between demo and test stays cheap
  { [ -f "$stamp" ] && grep -v "^$(echo "$want" | cut -d' ' -f1) " "$stamp" || true; } > "$stamp.new" || true
  echo "$want" >> "$stamp.new"
  mv "$stamp.new" "$stamp"
fi
export PATH="$VENV/bin:$PATH"

#!/usr/bin/env bash
# Creates .venv (when missing) and installs the pinned stack, Detectron2 included. Idempotent: a
# stamp records what was installed, and a second run with unchanged pins installs nothing.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
VENV=${VENV:-.venv}
PY="$VENV/bin/python"
stamp="$VENV/.dessam-stack"
want=$(cat requirements.txt scripts/setup_env.sh scripts/repack_detectron2.sh setup.py | sha256sum | cut -c1-16)
if [ -x "$PY" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x "$PY" ] || python3 -m venv "$VENV"
echo "[setup] installing the pinned stack into $VENV (first run only, ~2-5 min)"
export PIP_DISABLE_PIP_VERSION_CHECK=1
"$PY" -m pip install --quiet --upgrade "pip>=24"
"$PY" -m pip install --quiet torch==2.14.1 torchvision==0.29.1
"$PY" -m pip install --quiet -r requirements.txt
if ! "$PY" -c "import detectron2.modeling.backbone.vit" 2>/dev/null; then
  echo "[setup] repacking Detectron2 (sal-detectron2 0.7.2) as a pure wheel"
  bash scripts/repack_detectron2.sh "$PY"
fi
"$PY" -m pip install --quiet --no-deps --no-build-isolation -e .
"$PY" -c "import detectron2, segment_anything, torch, dessam_d2" 
echo "$want" >"$stamp"
echo "[setup] done"

#!/usr/bin/env bash
# Creates .venv (when missing) and installs the pinned stack, Detectron2 included. Idempotent: a
# stamp records what was installed, and a second run with unchanged pins installs nothing.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
VENV=${VENV:-.venv}
# The napari plugin's tests open real windows under Xvfb with Mesa's software OpenGL, and Qt 6
# needs the X client libraries: Debian's packages, installed once (as root, or say what to do).
GUI_PACKAGES="xvfb xauth xfonts-base libgl1-mesa-dri libegl1 libglx-mesa0 libdbus-1-3 libfontconfig1 \
libxkbcommon-x11-0 libxcb-cursor0 libxcb-icccm4 libxcb-image0 libxcb-keysyms1 libxcb-randr0 \
libxcb-render-util0 libxcb-shape0 libxcb-xinerama0 libxcb-xkb1"
# shellcheck disable=SC2086
if ! dpkg -s $GUI_PACKAGES >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[setup] installing Xvfb, Mesa and Qt's X libraries (apt-get)"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $GUI_PACKAGES >/dev/null
  else
    echo "[setup] the napari tests need: sudo apt-get install $GUI_PACKAGES" >&2
  fi
fi
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
# the napari plugin's extra (napari, a Qt binding): its dependencies, the rest is installed
"$PY" -m pip install --quiet --no-build-isolation -e ".[napari]"
"$PY" -c "import detectron2, segment_anything, torch, dessam_d2, napari"
echo "$want" >"$stamp"
echo "[setup] done"

#!/usr/bin/env bash
# Creates the venv of the tools users would pick instead of DES-SAM, for benchmarks/peers.py:
# segment-anything (SamPredictor), micro-sam (automatic instance segmentation) and Cellpose 4
# (Cellpose-SAM), on the same torch as the main venv. A separate venv because micro-sam pulls
# segment-anything-py, which installs its own segment_anything/ over segment-anything's; the peers
# are never dependencies of dessam_d2.
#
#   bash scripts/setup_peers_env.sh               # into .venv-peers
#   bash scripts/setup_peers_env.sh /some/venv    # elsewhere
#
# Idempotent: a stamp records what was installed, and a second run with unchanged pins installs
# nothing. First run: ~5-10 min and ~7 GB (micro-sam brings napari, Qt and CUDA runtime wheels).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
VENV=${1:-.venv-peers}
PY="$VENV/bin/python"
stamp="$VENV/.dessam-peers"
# The versions pip resolved together on CPython 3.11 (torch/torchvision as in scripts/setup_env.sh).
TORCH=(torch==2.14.1 torchvision==0.29.1)
PEERS=(segment-anything==1.0 micro_sam==1.8.14 cellpose==4.2.1.1)
want=$(cat scripts/setup_peers_env.sh | sha256sum | cut -c1-16)
if [ -x "$PY" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x "$PY" ] || python3 -m venv "$VENV"
echo "[setup-peers] installing the peers into $VENV (first run only, ~5-10 min)"
export PIP_DISABLE_PIP_VERSION_CHECK=1
"$PY" -m pip install --quiet --upgrade "pip>=24"
"$PY" -m pip install --quiet "${TORCH[@]}"
"$PY" -m pip install --quiet "${TORCH[@]}" "${PEERS[@]}"
# segment-anything-py (a micro-sam dependency) overwrote segment_anything/: put Meta's package back
# so that sam_predictor_* times segment-anything itself; micro-sam imports the same API from it.
"$PY" -m pip install --quiet --no-deps --force-reinstall segment-anything==1.0
"$PY" -c "import torch, segment_anything, micro_sam, cellpose.vit; print('[setup-peers] torch', \
torch.__version__, '| micro_sam', micro_sam.__version__)"
echo "$want" >"$stamp"
echo "[setup-peers] done"

#!/usr/bin/env bash
# Detectron2 is on PyPI only as `sal-detectron2`, with CPython 3.10 wheels. Its Python code runs on
# 3.11: repack the wheel as a pure one without the C++ extension (ROIAlign/NMS come from
# torchvision) and install it. Usage: repack_detectron2.sh PYTHON
set -euo pipefail
PY=${1:-python}
VERSION=0.7.2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.10 \
  "sal-detectron2==$VERSION" -d "$work/dl"
whl=$(ls "$work"/dl/sal_detectron2-$VERSION-*.whl | head -n 1)
"$PY" -m wheel unpack "$whl" -d "$work/unpacked" >/dev/null
tree="$work/unpacked/sal_detectron2-$VERSION"
rm -f "$tree"/detectron2/_C*.so
rm -rf "$tree/tools"
dist="$tree/sal_detectron2-$VERSION.dist-info"
echo detectron2 >"$dist/top_level.txt"
sed -i '/^Requires-Dist: numpy<2/d' "$dist/METADATA"
sed -i -e 's/^Root-Is-Purelib: .*/Root-Is-Purelib: true/' -e 's/^Tag: .*/Tag: py3-none-any/' \
  "$dist/WHEEL"
# RECORD lists the files removed above; wheel pack rewrites it from the tree.
mkdir -p "$work/out"
"$PY" -m wheel pack "$tree" -d "$work/out" >/dev/null
"$PY" -m pip install --quiet --no-deps "$work"/out/*.whl

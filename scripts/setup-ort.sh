#!/usr/bin/env bash
# Install ONNX Runtime's shared library for sdxl-worker from the official PyPI wheel.
#
#   scripts/setup-ort.sh          # CPU build   (wheel "onnxruntime")
#   scripts/setup-ort.sh gpu      # CUDA build  (wheel "onnxruntime-gpu": CUDA 13, cuDNN 9)
#
# The libraries land in .ort/lib (or $ORT_DIR/lib). sdxl-worker looks there by itself (next to
# the repository it was built from, or ./.ort/lib); anywhere else, point ORT_DYLIB_PATH at
# libonnxruntime.so.<version>. ORT_VERSION overrides the version (1.31.1 matches ort 2.0.0-rc.15).
set -euo pipefail
variant="${1:-cpu}"
version="${ORT_VERSION:-1.31.1}"
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="${ORT_DIR:-$root/.ort}"
case "$variant" in
  cpu) package=onnxruntime ;;
  gpu) package=onnxruntime-gpu ;;
  *) echo "usage: $0 [cpu|gpu]" >&2; exit 2 ;;
esac
lib="$dest/lib/libonnxruntime.so.$version"
marker="$dest/lib/.variant"
if [ -f "$lib" ] && [ "$(cat "$marker" 2>/dev/null)" = "$variant" ]; then
  echo "ONNX Runtime $version ($variant) already in $dest/lib"
  exit 0
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
echo "Downloading $package==$version from PyPI ..."
python3 -m pip download -q --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  -d "$tmp" "$package==$version"
wheel="$(ls "$tmp"/*.whl | head -1)"
mkdir -p "$dest/lib"
rm -f "$dest"/lib/libonnxruntime*
python3 - "$wheel" "$dest/lib" <<'PY'
import os, sys, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        base = os.path.basename(name)
        if name.startswith("onnxruntime/capi/") and base.startswith("libonnxruntime"):
            with z.open(name) as src, open(os.path.join(out, base), "wb") as dst:
                dst.write(src.read())
            print("  installed", base)
PY
echo "$variant" > "$marker"
echo "ONNX Runtime $version ($variant) installed in $dest/lib"
echo "sdxl-worker finds it there; elsewhere: export ORT_DYLIB_PATH=$lib"

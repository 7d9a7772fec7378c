"""Fuse the float32 UNet of an export and convert it to float16 (onnx/optimize_sdxl.py), and lay
out a model directory whose other components are the float32 ones.

    python3 bench/gpu/optimize_unet.py FP32_DIR FUSED_DIR

The text encoders and the VAE stay float32 and unfused here: they run once per image, and the
VAE must decode in float32 anyway (the stock SDXL VAE overflows float16). `onnx/export_sdxl.py
--optimize` fuses every component; this keeps the benchmark's export inside one 10-minute call.
"""

import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "onnx"))

from export_sdxl import save_model  # noqa: E402
from optimize_sdxl import _check_numpy, optimize_component  # noqa: E402


def main():
    src, dst = sys.argv[1], sys.argv[2]
    _check_numpy()
    if os.path.exists(dst):
        shutil.rmtree(dst)
    os.makedirs(dst)
    for entry in os.listdir(src):
        if entry != "unet":
            os.symlink(os.path.join(src, entry), os.path.join(dst, entry))
    started = time.perf_counter()
    model = optimize_component(os.path.join(src, "unet", "model.onnx"), "unet", True)
    os.makedirs(os.path.join(dst, "unet"))
    shutil.copy2(os.path.join(src, "unet", "config.json"), os.path.join(dst, "unet", "config.json"))
    save_model(model.model, os.path.join(dst, "unet", "model.onnx"), external=True)
    counts = {op: n for op, n in model.get_fused_operator_statistics().items() if n}
    print(json.dumps({"optimize_s": time.perf_counter() - started, "fused": counts}), flush=True)


if __name__ == "__main__":
    main()

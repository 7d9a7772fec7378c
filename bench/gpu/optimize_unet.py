"""Build the benchmark's fused model directories from the float32 export (FP32_DIR).

    python3 bench/gpu/optimize_unet.py FP32_DIR FUSED_DIR
    python3 bench/gpu/optimize_unet.py --rest FP32_DIR FUSED_DIR VAE16_DIR
    python3 bench/gpu/optimize_unet.py --controlnet FP32_DIR FUSED_DIR CN_FP32_DIR CN_FUSED_DIR

The first form fuses the float32 UNet and converts it to float16 (onnx/optimize_sdxl.py) and lays
out FUSED_DIR with the other components linked to the float32 ones: the UNet alone takes most of
a 10-minute call. `--rest` then does what `onnx/export_sdxl.py --optimize` does to the text
encoders (fused, float16) in FUSED_DIR, and writes VAE16_DIR: FUSED_DIR with a fused float16 VAE
decoder, the configuration of an fp16-safe VAE (such as sdxl-vae-fp16-fix, the same architecture
with weights that stay inside float16's range). FUSED_DIR keeps the float32 VAE, what the stock
SDXL VAE needs.

`--controlnet` takes an export with `unet/model_controlnet.onnx` and a ControlNet export
(bench/gpu/controlnet_bench.py): FUSED_DIR gets the fused float16 residual UNet as its only UNet
graph and fused float16 text encoders (the VAE stays float32, linked), CN_FUSED_DIR the fused
float16 ControlNet (onnx/optimize_sdxl.py). The three fusions run in parallel processes.
"""

import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "onnx"))

from export_sdxl import save_model  # noqa: E402
from optimize_sdxl import (  # noqa: E402
    UNET_VARIANT,
    _check_numpy,
    optimize_component,
    optimize_controlnet,
    optimize_unet_variant,
)


def fuse_into(src, dst, name, model_type, float16):
    """Fuse `src/name` into `dst/name` (replacing a link or directory there); returns counts."""
    started = time.perf_counter()
    model = optimize_component(os.path.join(src, name, "model.onnx"), model_type, float16)
    target = os.path.join(dst, name)
    if os.path.islink(target):
        os.remove(target)
    elif os.path.exists(target):
        shutil.rmtree(target)
    os.makedirs(target)
    shutil.copy2(os.path.join(src, name, "config.json"), os.path.join(target, "config.json"))
    save_model(model.model, os.path.join(target, "model.onnx"), external=True)
    counts = {op: n for op, n in model.get_fused_operator_statistics().items() if n}
    return {"seconds": time.perf_counter() - started, "float16": float16, "fused": counts}


def _timed(fn, *args):
    started = time.perf_counter()
    report = fn(*args)
    report["seconds"] = time.perf_counter() - started
    return report


def _text_encoders(src, dst):
    return {name: fuse_into(src, dst, name, "clip", True) for name in ("text_encoder", "text_encoder_2")}


def controlnet_layout(src, dst, cn_src, cn_dst):
    from concurrent.futures import ProcessPoolExecutor

    if os.path.exists(dst):
        shutil.rmtree(dst)
    os.makedirs(os.path.join(dst, "unet"))
    for entry in os.listdir(src):
        if entry not in ("unet", "text_encoder", "text_encoder_2"):
            os.symlink(os.path.abspath(os.path.join(src, entry)), os.path.join(dst, entry))
    shutil.copy2(os.path.join(src, "unet", "config.json"), os.path.join(dst, "unet", "config.json"))
    with ProcessPoolExecutor(max_workers=3) as pool:
        unet = pool.submit(_timed, optimize_unet_variant, os.path.join(src, "unet", UNET_VARIANT), os.path.join(dst, "unet"))
        controlnet = pool.submit(_timed, optimize_controlnet, cn_src, cn_dst)
        text = pool.submit(_text_encoders, src, dst)
        report = {"unet_controlnet": unet.result(), "controlnet": controlnet.result(), **text.result()}
    print(json.dumps(report), flush=True)


def main():
    _check_numpy()
    if sys.argv[1] == "--controlnet":
        controlnet_layout(*sys.argv[2:6])
        return
    if sys.argv[1] == "--rest":
        src, dst, vae16 = sys.argv[2], sys.argv[3], sys.argv[4]
        report = {}
        for name in ("text_encoder", "text_encoder_2"):
            report[name] = fuse_into(src, dst, name, "clip", True)
        if os.path.exists(vae16):
            shutil.rmtree(vae16)
        os.makedirs(vae16)
        for entry in os.listdir(dst):
            if entry != "vae_decoder":
                os.symlink(os.path.realpath(os.path.join(dst, entry)), os.path.join(vae16, entry))
        report["vae_decoder"] = fuse_into(src, vae16, "vae_decoder", "vae", True)
        print(json.dumps(report), flush=True)
        return
    src, dst = sys.argv[1], sys.argv[2]
    if os.path.exists(dst):
        shutil.rmtree(dst)
    os.makedirs(dst)
    for entry in os.listdir(src):
        if entry != "unet":
            os.symlink(os.path.abspath(os.path.join(src, entry)), os.path.join(dst, entry))
    started = time.perf_counter()
    model = optimize_component(os.path.join(src, "unet", "model.onnx"), "unet", True)
    os.makedirs(os.path.join(dst, "unet"))
    shutil.copy2(os.path.join(src, "unet", "config.json"), os.path.join(dst, "unet", "config.json"))
    save_model(model.model, os.path.join(dst, "unet", "model.onnx"), external=True)
    counts = {op: n for op, n in model.get_fused_operator_statistics().items() if n}
    print(json.dumps({"optimize_s": time.perf_counter() - started, "fused": counts}), flush=True)


if __name__ == "__main__":
    main()

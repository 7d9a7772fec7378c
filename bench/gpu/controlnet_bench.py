"""diffusers' SDXL ControlNet pipeline on the GPU, next to the plain SDXL pipeline, and the ONNX
export of both, for the engine's ControlNet measurements.

    python3 bench/gpu/controlnet_bench.py --out DIR [--export-controlnet CONTROLNET_DIR]
    python3 bench/gpu/controlnet_bench.py --export ONNX_DIR

The first form builds the full-size random-weight pipeline (full_sdxl.py) and a full-size
ControlNet for its UNet (`full_sdxl.build_controlnet`), both in float16, eager PyTorch with SDPA
attention, and measures with CUDA events:
- one UNet evaluation at batch 2 (one 1024x1024 image with classifier-free guidance), one
  ControlNet evaluation, and one ControlNet evaluation followed by the UNet taking its residuals;
- the whole pipeline, 30 Euler steps at 1024x1024, one image, without and with the ControlNet
  (StableDiffusionXLControlNetPipeline on the same modules, conditioning scale 1, a synthetic
  edge image: the one benches/gpu_engine.rs draws);
- peak GPU memory of each.
Results go to DIR/torch-controlnet.json.

`--export-controlnet` and `--export` write the float32 ONNX exports of the same weights: the
ControlNet (onnx/export_controlnet.py), and the SDXL pipeline with `unet/model_controlnet.onnx`
(onnx/export_sdxl.py).
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "onnx"))

import full_sdxl  # noqa: E402
import torch_bench  # noqa: E402


def edge_image(size):
    """White rings and spokes on black, like an edge map (benches/gpu_engine.rs `edge_image`)."""
    from PIL import Image

    c = size / 2.0
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    dx, dy = x - c, y - c
    ring = np.modf(np.hypot(dx, dy) / (c / 6.0))[0] < 0.04
    spoke = np.abs(np.modf(np.degrees(np.arctan2(dy, dx)) / 30.0)[0]) < 0.02
    v = np.where(ring | spoke, 255, 0).astype(np.uint8)
    return Image.fromarray(np.stack([v, v, v], axis=-1), "RGB")


def controlnet_steps(unet, controlnet, rows):
    """Timed ControlNet alone, and ControlNet then UNet with its residuals, at `rows` rows."""
    inputs = torch_bench.unet_inputs(unet, rows, torch.float16)
    cond = torch.rand(rows, 3, 1024, 1024, device="cuda", dtype=torch.float16)

    def control():
        return controlnet(
            inputs["sample"],
            inputs["timestep"],
            encoder_hidden_states=inputs["encoder_hidden_states"],
            controlnet_cond=cond,
            conditioning_scale=1.0,
            added_cond_kwargs=inputs["added_cond_kwargs"],
            return_dict=False,
        )

    def both():
        down, mid = control()
        unet(
            **inputs,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
            return_dict=False,
        )

    return {
        "rows": rows,
        "controlnet": torch_bench.time_cuda(control, 3, 20),
        "controlnet_and_unet": torch_bench.time_cuda(both, 3, 20),
    }


def measure(out_dir, runs):
    from diffusers import StableDiffusionXLControlNetPipeline

    started = time.perf_counter()
    pipe = full_sdxl.build("cuda")
    controlnet = full_sdxl.build_controlnet(pipe.unet)
    pipe.to(torch.float16)
    controlnet.to(torch.float16)
    pipe.set_progress_bar_config(disable=True)
    report = {
        **torch_bench.run_facts(pipe, started),
        "controlnet_parameters": sum(p.numel() for p in controlnet.parameters()),
    }
    report["unet_step_b2"] = torch_bench.time_unet(pipe.unet, 2, warmup=3, iters=20)
    report["controlnet_step_b2"] = controlnet_steps(pipe.unet, controlnet, 2)
    print(json.dumps(report), flush=True)
    report["pipeline_1"] = torch_bench.time_pipeline(pipe, 1, runs)
    print(json.dumps(report["pipeline_1"]), flush=True)
    control_pipe = StableDiffusionXLControlNetPipeline(
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        text_encoder_2=pipe.text_encoder_2,
        tokenizer=pipe.tokenizer,
        tokenizer_2=pipe.tokenizer_2,
        unet=pipe.unet,
        controlnet=controlnet,
        scheduler=pipe.scheduler,
        add_watermarker=False,
    )
    control_pipe.set_progress_bar_config(disable=True)
    report["pipeline_1_controlnet"] = torch_bench.time_pipeline(
        control_pipe, 1, runs, image=edge_image(1024), controlnet_conditioning_scale=1.0
    )
    print(json.dumps(report["pipeline_1_controlnet"]), flush=True)
    with open(os.path.join(out_dir, "torch-controlnet.json"), "w") as f:
        json.dump(report, f, indent=1)


def export(onnx_dir, controlnet_dir):
    """Write the float32 exports asked for (either may be None)."""
    from export_controlnet import export_controlnet
    from export_sdxl import export_pipeline

    started = time.perf_counter()
    pipe = full_sdxl.build("cuda")
    log = lambda m: print("export:", m, flush=True)  # noqa: E731
    if controlnet_dir:
        controlnet = full_sdxl.build_controlnet(pipe.unet).to("cpu")
        log("controlnet")
        export_controlnet(controlnet, controlnet_dir, pipe.text_encoder_2.config.projection_dim, 8)
        del controlnet
    pipe.to("cpu")
    if onnx_dir:
        export_pipeline(pipe, onnx_dir, log=log, controlnet_unet=True)
    print(json.dumps({"export_s": time.perf_counter() - started}), flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", help="measure, and write DIR/torch-controlnet.json")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--export", help="write the float32 ONNX export of the SDXL pipeline here")
    p.add_argument("--export-controlnet", help="write the float32 ONNX export of the ControlNet here")
    args = p.parse_args()
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        measure(args.out, args.runs)
        torch.cuda.empty_cache()
    if args.export or args.export_controlnet:
        export(args.export, args.export_controlnet)


if __name__ == "__main__":
    main()

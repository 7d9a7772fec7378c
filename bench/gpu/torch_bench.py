"""diffusers' SDXL pipeline on the GPU, the reference the engine is measured against.

    python3 bench/gpu/torch_bench.py --mode eager   --out DIR [--export ONNX_DIR]
    python3 bench/gpu/torch_bench.py --mode compile --out DIR

Builds the full-size random-weight pipeline (full_sdxl.py) in float16 (the VAE upcasts to float32
for decoding, as diffusers does for the stock SDXL VAE) and measures, with CUDA events:
- one UNet evaluation at batch 2 (one 1024x1024 image with classifier-free guidance), and at
  batch 8 (four images);
- the whole pipeline, 30 Euler steps at 1024x1024, one image (prompt to PIL image), and four;
- eager only: one image again with the VAE decoding in float16 (`force_upcast` off), what
  diffusers does with an fp16-safe VAE such as sdxl-vae-fp16-fix;
- peak GPU memory of each.

`--mode none` only exports. `--mode eager` runs PyTorch eagerly with SDPA attention; `--mode compile` wraps the UNet in
`torch.compile(mode="reduce-overhead")` (CUDA graphs; the first calls compile for minutes).
`--export` then writes the float32 ONNX export of the same weights with onnx/export_sdxl.py.
Results go to DIR/torch-<mode>.json.
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "onnx"))

import full_sdxl  # noqa: E402

PROMPT = "a photograph of an astronaut riding a horse on the moon, detailed, sharp focus"
NEGATIVE = "blurry, low quality"


def unet_inputs(unet, rows, dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    side = 128
    return dict(
        sample=torch.randn(rows, 4, side, side, generator=g, device="cuda", dtype=dtype),
        timestep=torch.tensor(999.0, device="cuda"),
        encoder_hidden_states=torch.randn(rows, 77, 2048, generator=g, device="cuda", dtype=dtype),
        added_cond_kwargs=dict(
            text_embeds=torch.randn(rows, 1280, generator=g, device="cuda", dtype=dtype),
            time_ids=torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * rows, device="cuda", dtype=dtype),
        ),
    )


def time_cuda(fn, warmup, iters):
    """Milliseconds per call of `fn` on the GPU (CUDA events), median and minimum of `iters`
    after `warmup` calls."""
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(iters):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    return {"median_ms": statistics.median(times), "min_ms": min(times), "iters": iters}


def time_unet(unet, rows, warmup, iters):
    inputs = unet_inputs(unet, rows, torch.float16)
    return {"rows": rows, **time_cuda(lambda: unet(**inputs, return_dict=False), warmup, iters)}


def time_pipeline(pipe, images, runs, **extra):
    """Seconds per call of `pipe` (30 Euler steps at 1024x1024, `images` images, `extra`
    keyword arguments), median of `runs` after one warm-up call."""

    def once():
        torch.cuda.synchronize()
        started = time.perf_counter()
        out = pipe(
            PROMPT,
            negative_prompt=NEGATIVE,
            num_inference_steps=30,
            height=1024,
            width=1024,
            guidance_scale=5.0,
            num_images_per_prompt=images,
            generator=torch.Generator(device="cuda").manual_seed(1),
            **extra,
        ).images
        torch.cuda.synchronize()
        assert len(out) == images
        return time.perf_counter() - started

    once()  # warm-up (and, compiled, the remaining recompilations)
    torch.cuda.reset_peak_memory_stats()
    seconds = [once() for _ in range(runs)]
    return {
        "images": images,
        "steps": 30,
        "size": 1024,
        "median_s": statistics.median(seconds),
        "seconds": seconds,
        "images_per_s": images / statistics.median(seconds),
        "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20,
    }


def run_facts(pipe, started):
    """The GPU, library versions, build time and UNet size a report starts with."""
    import diffusers

    return {
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "cuda": torch.version.cuda,
        "build_s": time.perf_counter() - started,
        "unet_parameters": sum(p.numel() for p in pipe.unet.parameters()),
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument(
        "--mode",
        choices=["eager", "compile", "none"],
        required=True,
        help="none: no timings, only the export",
    )
    p.add_argument("--out", required=True)
    p.add_argument("--export", help="also write the float32 ONNX export here")
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.mode != "none":
        measure(args)
    if args.export:
        from export_sdxl import export_pipeline

        torch.cuda.empty_cache()
        pipe = full_sdxl.build("cuda")
        pipe.to("cpu")
        started = time.perf_counter()
        export_pipeline(pipe, args.export, log=lambda m: print("export:", m, flush=True))
        print(json.dumps({"export_s": time.perf_counter() - started}), flush=True)


def measure(args):
    """Time diffusers in `args.mode` and write OUT/torch-MODE.json."""
    started = time.perf_counter()
    pipe = full_sdxl.build("cuda")
    pipe.to(torch.float16)
    pipe.set_progress_bar_config(disable=True)
    report = {"mode": args.mode, **run_facts(pipe, started)}
    if args.mode == "compile":
        started = time.perf_counter()
        pipe.unet = torch.compile(pipe.unet, mode="reduce-overhead", fullgraph=True)
        report["unet_step_b2"] = time_unet(pipe.unet, 2, warmup=3, iters=20)
        report["compile_s"] = time.perf_counter() - started
    else:
        report["unet_step_b2"] = time_unet(pipe.unet, 2, warmup=3, iters=20)
        report["unet_step_b8"] = time_unet(pipe.unet, 8, warmup=2, iters=10)
    print(json.dumps(report), flush=True)
    report["pipeline_1"] = time_pipeline(pipe, 1, args.runs)
    print(json.dumps(report["pipeline_1"]), flush=True)
    if args.mode == "eager":
        report["pipeline_4"] = time_pipeline(pipe, 4, 2)
        pipe.vae.register_to_config(force_upcast=False)  # config is a FrozenDict
        report["pipeline_1_vae_fp16"] = time_pipeline(pipe, 1, args.runs)
        pipe.vae.register_to_config(force_upcast=True)
    with open(os.path.join(args.out, f"torch-{args.mode}.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()

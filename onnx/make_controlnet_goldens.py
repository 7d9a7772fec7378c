"""Regenerate the tiny ControlNet exports, their diffusers goldens and the canny fixtures.

    python onnx/make_goldens.py --only tiny          # the tiny SDXL export, with unet/model_controlnet.onnx
    python onnx/make_controlnet_goldens.py           # everything below
    python onnx/make_controlnet_goldens.py --only canny

Writes, relative to the repository root:

- `tests/fixtures/tiny-controlnet/{canny,depth}/`: the ControlNets of `tiny_controlnet.py`,
  exported by `export_controlnet.py` (float16-stored weights, float32 compute), checked against
  PyTorch together with the tiny UNet's residual variant.
- `tests/fixtures/golden/controlnet/`: diffusers `StableDiffusionXLControlNetPipeline` runs
  (PyTorch, float32, CPU) with the project's seeded noise, as `make_goldens.py` makes the
  text-to-image ones; see `manifest.json` there.
- `tests/fixtures/tiny-preprocessor/depth/`: a stand-in ONNX depth estimator and the control
  image the engine must compute with it from a canny fixture photograph.
- `tests/fixtures/canny/`: real photographs from scikit-image's bundled sample data (160²
  crops) and OpenCV's `Canny(image, low, high)` of each, for the built-in edge detector's tests.
"""

import argparse
import json
import os
import shutil
import sys

import numpy as np
import onnx
import onnxruntime as ort
import torch
from PIL import Image

from export_controlnet import UNET_VARIANT, export_controlnet
from make_goldens import SchedulerNoise, _write_f32, build_scheduler, versions
from sdxl_noise import BatchNoise
from tiny_controlnet import CONTROLNETS, build_tiny_controlnet
from tiny_sdxl import SEED, build_tiny_pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_DIR = os.path.join("tests", "fixtures", "tiny-sdxl")
CONTROLNET_DIR = os.path.join("tests", "fixtures", "tiny-controlnet")
GOLDEN_DIR = os.path.join("tests", "fixtures", "golden", "controlnet")
CANNY_DIR = os.path.join("tests", "fixtures", "canny")

PROMPT = "a photograph of an astronaut riding a horse"
NEGATIVE = "blurry, low quality"

# scikit-image sample photographs (all shipped inside the package) and the crop taken of each.
PHOTOS = {
    "astronaut": ("astronaut", (40, 130)),
    "coffee": ("coffee", (60, 170)),
    "chelsea": ("chelsea", (20, 80)),
    "rocket": ("rocket", (100, 200)),
    "camera": ("camera", (100, 140)),
}
CROP = 160
# (low, high) thresholds of the canny fixtures; (100, 200) is the usual ControlNet setting.
CANNY_THRESHOLDS = [(100, 200), (50, 120)]


def _session(path):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def verify(pipe, controlnets, tol=1e-4, log=print):
    """Each ControlNet export and the UNet variant against PyTorch on random inputs."""
    gen = torch.Generator().manual_seed(1)
    unet = pipe.unet
    pooled = pipe.text_encoder_2.config.projection_dim
    variant = _session(os.path.join(REPO, TINY_DIR, "unet", UNET_VARIANT))
    for kind, cn in controlnets.items():
        sess = _session(os.path.join(REPO, CONTROLNET_DIR, kind, "model.onnx"))
        names = [o.name for o in sess.get_outputs()]
        for batch, h, w in ((2, 16, 16), (1, 24, 16)):
            inputs = {
                "sample": torch.randn(batch, 4, h, w, generator=gen),
                "timestep": torch.tensor(501.0),
                "encoder_hidden_states": torch.randn(batch, 77, 48, generator=gen),
                "controlnet_cond": torch.rand(batch, 3, h * 4, w * 4, generator=gen),
                "text_embeds": torch.randn(batch, pooled, generator=gen),
                "time_ids": torch.tensor([[h * 4.0, w * 4.0, 0.0, 0.0, h * 4.0, w * 4.0]] * batch),
            }
            with torch.no_grad():
                down, mid = cn(
                    inputs["sample"],
                    inputs["timestep"],
                    inputs["encoder_hidden_states"],
                    inputs["controlnet_cond"],
                    added_cond_kwargs={"text_embeds": inputs["text_embeds"], "time_ids": inputs["time_ids"]},
                    return_dict=False,
                )
                ref = unet(
                    inputs["sample"],
                    inputs["timestep"],
                    inputs["encoder_hidden_states"],
                    added_cond_kwargs={"text_embeds": inputs["text_embeds"], "time_ids": inputs["time_ids"]},
                    down_block_additional_residuals=down,
                    mid_block_additional_residual=mid,
                ).sample
            # A ControlNet without attention (depth) has no encoder_hidden_states input.
            declared = {i.name for i in sess.get_inputs()}
            feed = {k: v.numpy() for k, v in inputs.items() if k in declared}
            got = dict(zip(names, sess.run(None, feed)))
            want = [*down, mid]
            assert len(got) == len(want), (kind, len(got), len(want))
            for name, tensor in zip(names, want):
                err = float(np.abs(got[name] - tensor.numpy()).max())
                assert err <= tol, f"{kind} {name}: {err}"
            feed = {k: v.numpy() for k, v in inputs.items() if k != "controlnet_cond"}
            for i, d in enumerate(down):
                feed[f"down_block_additional_residual_{i}"] = d.numpy()
            feed["mid_block_additional_residual"] = mid.numpy()
            (out,) = variant.run(None, feed)
            err = float(np.abs(out - ref.numpy()).max())
            assert err <= tol, f"unet variant with {kind}: {err}"
        log(f"verified {kind} and the UNet variant")


def _control_images():
    """Deterministic control images: an edge map, a smooth depth-like map (of another size, so
    the pipeline resizes it) and a non-square edge map."""
    from skimage import data

    import cv2

    photo = np.asarray(Image.fromarray(data.astronaut()).resize((64, 64), Image.Resampling.BICUBIC))
    edges = cv2.Canny(photo, 100, 200)
    canny = np.repeat(edges[:, :, None], 3, axis=2)
    yy, xx = np.mgrid[0:48, 0:80].astype(np.float64)
    depth = 255 * np.exp(-(((xx - 50) / 30) ** 2 + ((yy - 20) / 18) ** 2))
    depth = np.clip(depth + 40 * (yy / 47), 0, 255).round().astype(np.uint8)
    depth = np.repeat(depth[:, :, None], 3, axis=2)
    wide = np.asarray(Image.fromarray(data.coffee()).resize((96, 64), Image.Resampling.BICUBIC))
    wide_edges = np.repeat(cv2.Canny(wide, 100, 200)[:, :, None], 3, axis=2)
    return {
        "canny_64x64.png": canny,
        "depth_80x48.png": depth,
        "canny_96x64.png": wide_edges,
    }


# Pillow Lanczos resizes kept as goldens for the engine's resize: (source, (width, height)).
RESIZES = [("depth_80x48.png", (64, 64)), ("canny_96x64.png", (40, 72)), ("depth_80x48.png", (200, 40))]

BASE = dict(prompt=PROMPT, negative_prompt=NEGATIVE, width=64, height=64, steps=8, guidance_scale=5.0, seed=42)


def _cn(kind, image, scale=1.0, start=0.0, end=1.0):
    return {"type": kind, "image": image, "conditioning_scale": scale, "control_guidance_start": start, "control_guidance_end": end}


CASES = [
    dict(BASE, name="canny_euler", scheduler="euler", controlnets=[_cn("canny", "canny_64x64.png", 0.8)]),
    dict(BASE, name="depth_resized_dpmpp_2m", scheduler="dpmpp_2m", seed=7, controlnets=[_cn("depth", "depth_80x48.png", 1.0)]),
    dict(
        BASE,
        name="multi_start_end_euler_a",
        scheduler="euler_a",
        seed=8,
        controlnets=[_cn("canny", "canny_64x64.png", 0.7, 0.0, 0.6), _cn("depth", "depth_80x48.png", 1.2, 0.3, 1.0)],
    ),
    dict(BASE, name="canny_guess_mode", scheduler="euler", seed=9, guess_mode=True, controlnets=[_cn("canny", "canny_64x64.png", 1.0)]),
    dict(
        BASE,
        name="multi_guess_mode_two_images",
        scheduler="dpmpp_2m_karras",
        seed=10,
        num_images=2,
        guess_mode=True,
        controlnets=[_cn("depth", "depth_80x48.png", 0.9, 0.0, 0.5), _cn("canny", "canny_64x64.png", 1.1, 0.25, 1.0)],
    ),
    dict(BASE, name="canny_no_cfg_non_square", scheduler="euler", seed=11, width=96, height=64, guidance_scale=1.0, controlnets=[_cn("canny", "canny_96x64.png", 1.0, 0.0, 0.75)]),
]


def run_case(base, controlnets, case, out_dir):
    from diffusers import StableDiffusionXLControlNetPipeline

    nets = [controlnets[c["type"]] for c in case["controlnets"]]
    pipe = StableDiffusionXLControlNetPipeline(
        vae=base.vae,
        text_encoder=base.text_encoder,
        text_encoder_2=base.text_encoder_2,
        tokenizer=base.tokenizer,
        tokenizer_2=base.tokenizer_2,
        unet=base.unet,
        controlnet=nets[0] if len(nets) == 1 else nets,
        scheduler=base.scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    n = case.get("num_images", 1)
    shape = (n, 4, case["height"] // 4, case["width"] // 4)
    noise = BatchNoise([case["seed"] + i for i in range(n)])
    init = torch.from_numpy(noise.sample(shape))
    scheduler = build_scheduler(pipe, case)
    pipe.scheduler = scheduler
    step_noise = SchedulerNoise(noise)
    module = sys.modules[type(scheduler).__module__]
    saved = getattr(module, "randn_tensor", None)
    if saved is not None:
        module.randn_tensor = step_noise
    final = {}

    def keep_latents(_pipe, _step, _timestep, kwargs):
        final["latents"] = kwargs["latents"].clone()
        return {}

    images = [Image.open(os.path.join(out_dir, c["image"])).convert("RGB") for c in case["controlnets"]]
    single = len(nets) == 1
    pick = (lambda key: case["controlnets"][0][key]) if single else (lambda key: [c[key] for c in case["controlnets"]])
    try:
        result = pipe(
            prompt=case["prompt"],
            negative_prompt=case["negative_prompt"],
            image=images[0] if single else images,
            width=case["width"],
            height=case["height"],
            num_inference_steps=case["steps"],
            guidance_scale=case["guidance_scale"],
            num_images_per_prompt=n,
            latents=init.clone(),
            controlnet_conditioning_scale=pick("conditioning_scale"),
            control_guidance_start=pick("control_guidance_start"),
            control_guidance_end=pick("control_guidance_end"),
            guess_mode=case.get("guess_mode", False),
            output_type="pil",
            callback_on_step_end=keep_latents,
            callback_on_step_end_tensor_inputs=["latents"],
        )
    finally:
        if saved is not None:
            module.randn_tensor = saved
    name = case["name"]
    files = {"init_latents": f"{name}.init_latents.f32", "latents": f"{name}.latents.f32", "images": []}
    _write_f32(os.path.join(out_dir, files["init_latents"]), init)
    _write_f32(os.path.join(out_dir, files["latents"]), final["latents"])
    for i, image in enumerate(result.images):
        file = f"{name}.{i}.png"
        image.save(os.path.join(out_dir, file), format="PNG")
        files["images"].append(file)
    request = {k: case.get(k) for k in ("prompt", "negative_prompt", "width", "height", "steps", "guidance_scale", "scheduler", "seed")}
    request.update(num_images=n, guess_mode=case.get("guess_mode", False), controlnets=case["controlnets"])
    return {
        "name": name,
        "request": request,
        "timesteps": [float(t) for t in scheduler.timesteps],
        "latent_shape": list(shape),
        **files,
    }


def make_models(pipe, log=print):
    out = os.path.join(REPO, CONTROLNET_DIR)
    if os.path.exists(out):
        shutil.rmtree(out)
    controlnets = {}
    for kind in CONTROLNETS:
        cn = build_tiny_controlnet(kind)
        export_controlnet(cn, os.path.join(out, kind), pipe.text_encoder_2.config.projection_dim, 4, float16_storage=True)
        controlnets[kind] = cn
        log(f"exported {kind}")
    verify(pipe, controlnets, log=log)
    return controlnets


def make_pipeline_goldens(pipe, controlnets, log=print):
    out = os.path.join(REPO, GOLDEN_DIR)
    if os.path.exists(out):
        shutil.rmtree(out)
    os.makedirs(out)
    for file, pixels in _control_images().items():
        Image.fromarray(pixels).save(os.path.join(out, file), format="PNG")
    # Pillow's Lanczos resizes (what the pipeline does to control images), up and down.
    resizes = []
    for source, (w, h) in RESIZES:
        image = Image.open(os.path.join(out, source)).convert("RGB")
        file = f"{source[:-4]}.resized_{w}x{h}.png"
        image.resize((w, h), Image.Resampling.LANCZOS).save(os.path.join(out, file), format="PNG")
        resizes.append({"source": source, "size": [w, h], "file": file})
    cases = []
    for case in CASES:
        log(f"case {case['name']}")
        cases.append(run_case(pipe, controlnets, case, out))
    manifest = {
        "description": (
            "diffusers StableDiffusionXLControlNetPipeline (PyTorch, float32, CPU) outputs of the tiny "
            "pipeline in tests/fixtures/tiny-sdxl with the ControlNets in tests/fixtures/tiny-controlnet, "
            "made by onnx/make_controlnet_goldens.py"
        ),
        "model": TINY_DIR,
        "controlnets": {kind: os.path.join(CONTROLNET_DIR, kind) for kind in CONTROLNETS},
        "versions": versions(),
        "control_images": "8-bit RGB PNGs in this directory, passed to the pipeline as PIL images (it resizes them with Lanczos)",
        "init_latents": "as in golden/pipeline: BatchNoise([seed + i ...]).sample(latent_shape), before init_noise_sigma",
        "latents": "raw little-endian float32 final latents, before division by scaling_factor",
        "cases": cases,
        "resizes": resizes,
    }
    with open(os.path.join(out, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")


def make_canny_fixtures(log=print):
    import cv2
    import skimage
    from skimage import data

    out = os.path.join(REPO, CANNY_DIR)
    if os.path.exists(out):
        shutil.rmtree(out)
    os.makedirs(out)
    entries = []
    for name, (loader, (top, left)) in PHOTOS.items():
        pixels = getattr(data, loader)()
        if pixels.ndim == 2:
            pixels = np.repeat(pixels[:, :, None], 3, axis=2)
        crop = np.ascontiguousarray(pixels[top : top + CROP, left : left + CROP, :3])
        Image.fromarray(crop).save(os.path.join(out, f"{name}.png"), format="PNG")
        edges = {}
        for low, high in CANNY_THRESHOLDS:
            file = f"{name}.canny_{low}_{high}.png"
            Image.fromarray(cv2.Canny(crop, low, high)).save(os.path.join(out, file), format="PNG")
            edges[f"{low},{high}"] = file
        entries.append({"name": name, "source": f"skimage.data.{loader}()", "crop_top_left": [top, left], "image": f"{name}.png", "edges": edges})
        log(f"canny fixture {name}")
    manifest = {
        "description": (
            "centre crops of scikit-image sample photographs (RGB) and OpenCV's Canny(image, low, high) "
            "of each (aperture 3, L1 gradient; 255 = edge), made by onnx/make_controlnet_goldens.py"
        ),
        "versions": {"opencv": cv2.__version__, "scikit-image": skimage.__version__},
        "crop": CROP,
        "photos": entries,
    }
    with open(os.path.join(out, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")


PREPROCESSOR_DIR = os.path.join("tests", "fixtures", "tiny-preprocessor", "depth")
PREPROCESSOR = {"input_size": 160, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "output": "map"}


def make_preprocessor(log=print):
    """A stand-in depth estimator for the ONNX preprocessor path: 2x2 average pooling of the
    normalized image, then the mean over channels, as [1, S/2, S/2]. Its expected control image
    for the astronaut crop is computed here as the engine documents it: min-max to 0..255
    (rounded half up), grey on three channels, Lanczos-resized back to the photo's size."""
    from onnx import TensorProto, helper

    out = os.path.join(REPO, PREPROCESSOR_DIR)
    if os.path.exists(out):
        shutil.rmtree(out)
    os.makedirs(out)
    side = PREPROCESSOR["input_size"]
    nodes = [
        helper.make_node("AveragePool", ["pixel_values"], ["pooled"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("ReduceMean", ["pooled"], ["predicted_depth"], axes=[1], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_depth",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, [1, 3, side, side])],
        [helper.make_tensor_value_info("predicted_depth", TensorProto.FLOAT, [1, side // 2, side // 2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, os.path.join(out, "model.onnx"))
    with open(os.path.join(out, "preprocessor.json"), "w", encoding="utf-8") as f:
        json.dump(PREPROCESSOR, f, indent=2)
        f.write("\n")
    photo = np.asarray(Image.open(os.path.join(REPO, CANNY_DIR, "astronaut.png")).convert("RGB"))
    x = photo.astype(np.float32).transpose(2, 0, 1)[None] / np.float32(255.0)
    mean = np.array(PREPROCESSOR["mean"], np.float32)[None, :, None, None]
    std = np.array(PREPROCESSOR["std"], np.float32)[None, :, None, None]
    x = (x - mean) / std
    sess = _session(os.path.join(out, "model.onnx"))
    (depth,) = sess.run(None, {"pixel_values": x.astype(np.float32)})
    d = depth[0]
    lo, hi = d.min(), d.max()
    gray = np.floor((d - lo) / (hi - lo) * np.float32(255.0) + np.float32(0.5)).clip(0, 255).astype(np.uint8)
    rgb = Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2))
    expected = rgb.resize((photo.shape[1], photo.shape[0]), Image.Resampling.LANCZOS)
    expected.save(os.path.join(out, "astronaut.expected.png"), format="PNG")
    log("preprocessor fixture")


def main(argv=None):
    p = argparse.ArgumentParser(description="Regenerate the ControlNet fixtures and goldens.")
    p.add_argument("--only", choices=("models", "pipeline", "canny", "preprocessor"), action="append")
    args = p.parse_args(argv)
    parts = set(args.only or ("models", "pipeline", "canny", "preprocessor"))
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    if "canny" in parts:
        make_canny_fixtures()
    if "preprocessor" in parts:
        make_preprocessor()
    if parts & {"models", "pipeline"}:
        pipe = build_tiny_pipeline(SEED)
        if "models" in parts:
            controlnets = make_models(pipe)
        else:
            controlnets = {kind: build_tiny_controlnet(kind) for kind in CONTROLNETS}
        if "pipeline" in parts:
            make_pipeline_goldens(pipe, controlnets)
    return 0


if __name__ == "__main__":
    sys.exit(main())

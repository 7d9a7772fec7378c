"""Image-to-image goldens from diffusers' StableDiffusionXLImg2ImgPipeline for tests/img2img.rs.

    /work/venv/bin/python onnx/golden_img2img.py

Runs the tiny pipeline (`tiny_sdxl.py`, the weights of tests/fixtures/tiny-sdxl) as
`StableDiffusionXLImg2ImgPipeline` in PyTorch, float32, on the CPU, from the init image
tests/fixtures/golden/pipeline/euler_basic.0.png, and writes to tests/fixtures/golden/img2img/:
`<case>.latents.f32` (final latents, little-endian float32), `<case>.0.png` and `manifest.json`.

All randomness comes from the project's noise streams (`sdxl_noise.py`, one stream seeded with
the case's seed), patched into diffusers in place of `randn_tensor` where it is called, in the
order diffusers calls it: the latent distribution's sample (`retrieve_latents`, sample mode), then
the noise `prepare_latents` adds, then any scheduler step noise. The engine draws in that order.
"""

import json
import os
import sys

import numpy as np
import torch
from PIL import Image

from golden_cases import SCHEDULERS
from sdxl_noise import BatchNoise
from tiny_sdxl import SEED, build_tiny_pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(REPO, "tests", "fixtures", "golden", "img2img")
INIT_IMAGE = "../pipeline/euler_basic.0.png"

CASES = [
    {"name": "euler_strength_0_6", "scheduler": "euler", "steps": 10, "strength": 0.6, "seed": 5},
    {"name": "euler_a_strength_0_5", "scheduler": "euler_a", "steps": 8, "strength": 0.5, "seed": 6},
    {"name": "dpmpp_2m_karras_strength_0_75", "scheduler": "dpmpp_2m_karras", "steps": 8, "strength": 0.75, "seed": 7},
    {"name": "heun_strength_0_5", "scheduler": "heun", "steps": 6, "strength": 0.5, "seed": 8},
    {"name": "unipc_strength_0_7", "scheduler": "unipc", "steps": 10, "strength": 0.7, "seed": 9},
]
PROMPT = "a watercolor painting of a lighthouse"
NEGATIVE = "blurry"
GUIDANCE = 5.0


class Noise:
    """`randn_tensor` drawing from the case's noise stream."""

    def __init__(self, seed):
        self.noise = BatchNoise([seed])
        self.draws = []

    def __call__(self, shape, generator=None, device=None, dtype=None, layout=None):
        self.draws.append(list(shape))
        sample = torch.from_numpy(self.noise.sample(tuple(shape)))
        return sample.to(device=device or "cpu", dtype=dtype or torch.float32)


def run_case(pipe, base_config, case, init_image):
    from diffusers.models.autoencoders import vae as vae_module
    from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl_img2img as i2i

    cls, kwargs = SCHEDULERS[case["scheduler"]]
    # Every case starts from the pipeline's own scheduler configuration.
    pipe.scheduler = cls.from_config(base_config, **kwargs)
    noise = Noise(case["seed"])
    modules = [vae_module, i2i, sys.modules[type(pipe.scheduler).__module__]]
    saved = [getattr(m, "randn_tensor", None) for m in modules]
    for m in modules:
        if hasattr(m, "randn_tensor"):
            m.randn_tensor = noise
    final = {}

    def keep(_pipe, _step, _timestep, kw):
        final["latents"] = kw["latents"].clone()
        return {}

    try:
        result = pipe(
            prompt=PROMPT,
            negative_prompt=NEGATIVE,
            image=init_image,
            strength=case["strength"],
            num_inference_steps=case["steps"],
            guidance_scale=GUIDANCE,
            output_type="pil",
            callback_on_step_end=keep,
            callback_on_step_end_tensor_inputs=["latents"],
        )
    finally:
        for m, s in zip(modules, saved):
            if s is not None:
                m.randn_tensor = s
    name = case["name"]
    latents = final["latents"].detach().to(torch.float32).contiguous().numpy().astype("<f4")
    with open(os.path.join(OUT, f"{name}.latents.f32"), "wb") as f:
        f.write(latents.tobytes())
    result.images[0].save(os.path.join(OUT, f"{name}.0.png"), format="PNG")
    return dict(
        case,
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        guidance_scale=GUIDANCE,
        width=init_image.width,
        height=init_image.height,
        latent_shape=list(latents.shape),
        noise_draws=noise.draws,
        timesteps=[float(t) for t in pipe.scheduler.timesteps],
        latents=f"{name}.latents.f32",
        images=[f"{name}.0.png"],
    )


def main():
    from diffusers import StableDiffusionXLImg2ImgPipeline
    import diffusers

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    base = build_tiny_pipeline(SEED)
    pipe = StableDiffusionXLImg2ImgPipeline(
        vae=base.vae,
        text_encoder=base.text_encoder,
        text_encoder_2=base.text_encoder_2,
        tokenizer=base.tokenizer,
        tokenizer_2=base.tokenizer_2,
        unet=base.unet,
        scheduler=base.scheduler,
    )
    pipe.set_progress_bar_config(disable=True)
    os.makedirs(OUT, exist_ok=True)
    init_image = Image.open(os.path.join(OUT, INIT_IMAGE)).convert("RGB")
    base_config = pipe.scheduler.config
    cases = [run_case(pipe, base_config, case, init_image) for case in CASES]
    manifest = {
        "description": (
            "diffusers StableDiffusionXLImg2ImgPipeline (PyTorch, float32, CPU) outputs of the "
            "tiny pipeline, made by onnx/golden_img2img.py"
        ),
        "diffusers": diffusers.__version__,
        "torch": torch.__version__,
        "init_image": INIT_IMAGE,
        "noise": (
            "one sdxl_noise stream seeded with the case's seed, drawn in order: the latent "
            "distribution's sample, the noise added at the first timestep, scheduler step noise"
        ),
        "cases": cases,
    }
    with open(os.path.join(OUT, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    for c in cases:
        print(c["name"], c["timesteps"], c["noise_draws"])


if __name__ == "__main__":
    main()

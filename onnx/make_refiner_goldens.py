"""Regenerate the tiny refiner fixture and the base -> refiner goldens of tests/refiner.rs.

    /work/venv/bin/python onnx/make_refiner_goldens.py            # both
    /work/venv/bin/python onnx/make_refiner_goldens.py --only golden

Writes, relative to the repository root:

- `tests/fixtures/tiny-refiner/`: the tiny refiner (`tiny_refiner.py`) exported to the ONNX layout
  and checked against PyTorch. Only `model_index.json`, `scheduler/` and `unet/` are stored; the
  components it shares with the tiny base pipeline (`text_encoder_2/`, `tokenizer_2/`,
  `vae_decoder/`, `vae_encoder/`) are relative symbolic links into `../tiny-sdxl/`, after checking
  that the refiner's own export of each is byte for byte the base's.
- `tests/fixtures/golden/refiner/`: diffusers runs (PyTorch, float32, CPU) of the base
  `StableDiffusionXLPipeline` with `denoising_end=f, output_type="latent"` handing its latents to
  the refiner `StableDiffusionXLImg2ImgPipeline` with `denoising_start=f` and the same number of
  steps: final latents (`<case>.latents.f32`, little-endian float32), decoded images and
  `manifest.json`.

All randomness comes from the project's noise streams (`sdxl_noise.py`, one stream per image
seeded with `seed + i`), patched into diffusers in place of `randn_tensor`: the base's initial
latents, then the step noise of stochastic schedulers, the refiner's continuing the same streams
(the refiner adds no noise at the hand-off). The engine draws in that order.
"""

import argparse
import filecmp
import json
import os
import shutil
import sys
import tempfile

import torch

from export_sdxl import export_pipeline
from golden_cases import SCHEDULERS
from make_goldens import link_duplicates
from sdxl_noise import BatchNoise, image_seed
from tiny_refiner import REFINER_SEED, build_tiny_refiner
from tiny_sdxl import SEED, build_tiny_pipeline
from verify_export import verify_export

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE_DIR = os.path.join("tests", "fixtures", "tiny-sdxl")
REFINER_DIR = os.path.join("tests", "fixtures", "tiny-refiner")
GOLDEN_DIR = os.path.join("tests", "fixtures", "golden", "refiner")
OWN = ("model_index.json", "scheduler", "unet")
SHARED = ("text_encoder_2", "tokenizer_2", "vae_decoder", "vae_encoder")

PROMPT = "a lighthouse on a cliff at dusk, oil painting"
NEGATIVE = "blurry, low quality"
BASE_CASE = {
    "prompt": PROMPT,
    "negative_prompt": NEGATIVE,
    "width": 64,
    "height": 64,
    "steps": 10,
    "guidance_scale": 5.0,
    "num_images": 1,
    "handoff": 0.8,
    "aesthetic_score": 6.0,
    "negative_aesthetic_score": 2.5,
}


def _case(name, **fields):
    return dict(BASE_CASE, name=name, **fields)


CASES = [
    _case("euler_handoff_0_8", scheduler="euler", seed=11),
    _case("euler_a_handoff_0_8_two_images", scheduler="euler_a", seed=12, num_images=2),
    _case("dpmpp_2m_karras_handoff_0_6", scheduler="dpmpp_2m_karras", seed=13, steps=12, handoff=0.6),
    _case("heun_handoff_0_7", scheduler="heun", seed=14, steps=6, handoff=0.7),
    _case("unipc_handoff_0_75_scores", scheduler="unipc", seed=15, handoff=0.75,
          aesthetic_score=7.5, negative_aesthetic_score=1.0),
    _case("euler_no_cfg_handoff_0_7", scheduler="euler", seed=16, steps=8, handoff=0.7,
          guidance_scale=1.0),
    _case("euler_no_negative_handoff_0_8", scheduler="euler", seed=17, negative_prompt=None),
]


class Noise:
    """`randn_tensor` drawing from the case's per-image streams."""

    def __init__(self, seeds):
        self.noise = BatchNoise(seeds)
        self.draws = []

    def __call__(self, shape, generator=None, device=None, dtype=None, layout=None):
        self.draws.append(list(shape))
        sample = torch.from_numpy(self.noise.sample(tuple(shape)))
        return sample.to(device=device or "cpu", dtype=dtype or torch.float32)


def make_fixture(base, refiner, repo, log=print):
    """Export the refiner, keep its own components and link the shared ones to the base's."""
    base_dir = os.path.join(repo, BASE_DIR)
    out = os.path.join(repo, REFINER_DIR)
    with tempfile.TemporaryDirectory() as tmp:
        export_pipeline(refiner, tmp, log=log)
        verify_export(refiner, tmp, log=log)
        for name in SHARED:
            ours, theirs = os.path.join(tmp, name), os.path.join(base_dir, name)
            cmp = filecmp.dircmp(ours, theirs)
            same = not cmp.left_only and not cmp.right_only
            same = same and all(
                filecmp.cmp(os.path.join(ours, f), os.path.join(theirs, f), shallow=False)
                for f in cmp.common_files
            )
            if not same:
                raise SystemExit(f"{name}: the refiner's export differs from {theirs}")
        if os.path.exists(out):
            shutil.rmtree(out)
        os.makedirs(out)
        for name in OWN:
            src = os.path.join(tmp, name)
            if os.path.isdir(src):
                shutil.copytree(src, os.path.join(out, name))
            else:
                shutil.copy(src, os.path.join(out, name))
    for name in SHARED:
        os.symlink(os.path.join("..", "tiny-sdxl", name), os.path.join(out, name))
    log(f"wrote {out}")


def run_case(base, refiner, base_config, refiner_config, case, out_dir):
    from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl as t2i
    from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl_img2img as i2i

    cls, kwargs = SCHEDULERS[case["scheduler"]]
    base.scheduler = cls.from_config(base_config, **kwargs)
    refiner.scheduler = cls.from_config(refiner_config, **kwargs)
    seeds = [image_seed(case["seed"], i) for i in range(case["num_images"])]
    noise = Noise(seeds)
    modules = {t2i, i2i, sys.modules[type(base.scheduler).__module__]}
    saved = {m: m.randn_tensor for m in modules if hasattr(m, "randn_tensor")}
    for m in saved:
        m.randn_tensor = noise
    steps = {"base": [], "refiner": []}
    final = {}

    def record(stage):
        def callback(_pipe, _step, timestep, kw):
            steps[stage].append(float(timestep))
            final["latents"] = kw["latents"].clone()
            return {}

        return callback

    common = dict(
        prompt=case["prompt"],
        negative_prompt=case["negative_prompt"],
        num_inference_steps=case["steps"],
        guidance_scale=case["guidance_scale"],
        num_images_per_prompt=case["num_images"],
        callback_on_step_end_tensor_inputs=["latents"],
    )
    try:
        handed = base(
            **common,
            width=case["width"],
            height=case["height"],
            denoising_end=case["handoff"],
            output_type="latent",
            callback_on_step_end=record("base"),
        ).images
        result = refiner(
            **common,
            image=handed,
            denoising_start=case["handoff"],
            aesthetic_score=case["aesthetic_score"],
            negative_aesthetic_score=case["negative_aesthetic_score"],
            output_type="pil",
            callback_on_step_end=record("refiner"),
        )
    finally:
        for m, s in saved.items():
            m.randn_tensor = s
    name = case["name"]
    latents = final["latents"].detach().to(torch.float32).contiguous().numpy().astype("<f4")
    with open(os.path.join(out_dir, f"{name}.latents.f32"), "wb") as f:
        f.write(latents.tobytes())
    images = []
    for i, image in enumerate(result.images):
        images.append(f"{name}.{i}.png")
        image.save(os.path.join(out_dir, images[-1]), format="PNG")
    return dict(
        case,
        latent_shape=list(latents.shape),
        noise_draws=noise.draws,
        base_timesteps=steps["base"],
        refiner_timesteps=steps["refiner"],
        latents=f"{name}.latents.f32",
        images=images,
    )


def make_goldens(base, refiner, repo, log=print):
    import diffusers

    out = os.path.join(repo, GOLDEN_DIR)
    os.makedirs(out, exist_ok=True)
    base_config, refiner_config = base.scheduler.config, refiner.scheduler.config
    cases = []
    for case in CASES:
        cases.append(run_case(base, refiner, base_config, refiner_config, case, out))
        c = cases[-1]
        log(c["name"], c["base_timesteps"], c["refiner_timesteps"], c["noise_draws"])
    manifest = {
        "description": (
            "diffusers StableDiffusionXLPipeline (denoising_end, latent output) handing over to "
            "StableDiffusionXLImg2ImgPipeline (denoising_start) on the tiny base and refiner "
            "(PyTorch, float32, CPU), made by onnx/make_refiner_goldens.py"
        ),
        "diffusers": diffusers.__version__,
        "torch": torch.__version__,
        "base": BASE_DIR,
        "refiner": REFINER_DIR,
        "noise": (
            "one sdxl_noise stream per image seeded with seed + i, drawn in order: the base's "
            "initial latents, then scheduler step noise of the base, then of the refiner"
        ),
        "cases": cases,
    }
    with open(os.path.join(out, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")


def main(argv=None):
    p = argparse.ArgumentParser(description="Regenerate the tiny refiner and its goldens.")
    p.add_argument("--repo", default=REPO, help="repository root")
    p.add_argument("--only", choices=("tiny", "golden"), action="append")
    args = p.parse_args(argv)
    parts = set(args.only or ("tiny", "golden"))

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    base = build_tiny_pipeline(SEED)
    refiner = build_tiny_refiner(REFINER_SEED, base=base)
    for pipe in (base, refiner):
        pipe.set_progress_bar_config(disable=True)
    if "golden" in parts:
        make_goldens(base, refiner, args.repo)
    if "tiny" in parts:
        link_duplicates(os.path.join(args.repo, BASE_DIR))
        make_fixture(base, refiner, args.repo)
    return 0


if __name__ == "__main__":
    sys.exit(main())

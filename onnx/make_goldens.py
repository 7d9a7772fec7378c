"""Regenerate the tiny SDXL export and the diffusers golden outputs the tests compare against.

    python onnx/make_goldens.py            # everything
    python onnx/make_goldens.py --only pipeline

Writes, relative to the repository root:

- `tests/fixtures/tiny-sdxl/`: the tiny pipeline (`tiny_sdxl.py`) exported to the ONNX layout,
  checked against PyTorch (files identical to another component's are stored as relative links,
  see `DUPLICATES`).
- `tests/fixtures/golden/pipeline/`: diffusers `StableDiffusionXLPipeline` runs (PyTorch, fp32,
  CPU) of the same weights, with the project's seeded noise; see `manifest.json` there.
- `tests/fixtures/golden/tokenizer/tokens.json`: the input ids of both tokenizers for a set of
  prompts (`golden_prompts.py`).

With the versions of `requirements.txt` the output is the same byte for byte: PyTorch runs on one
thread with deterministic algorithms, and all noise comes from `sdxl_noise.py`.
"""

import argparse
import filecmp
import json
import os
import shutil
import sys

import numpy as np
import torch

from export_sdxl import export_pipeline
from golden_cases import CASES, SCHEDULERS
from sdxl_noise import BatchNoise
from tiny_sdxl import SEED, build_tiny_pipeline
from verify_export import verify_export

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_DIR = os.path.join("tests", "fixtures", "tiny-sdxl")
PIPELINE_DIR = os.path.join("tests", "fixtures", "golden", "pipeline")
TOKENIZER_DIR = os.path.join("tests", "fixtures", "golden", "tokenizer")
# A decoded golden image must not be flat: the mean per-channel standard deviation of its
# 0..255 pixel values must exceed this.
MIN_IMAGE_STD = 8.0


# Files of the export that are byte for byte another component's (the two tokenizers share CLIP's
# vocabulary and merges): the copy is stored as a relative symbolic link to keep the fixtures small.
DUPLICATES = [
    ("tokenizer_2/vocab.json", "tokenizer/vocab.json"),
    ("tokenizer_2/merges.txt", "tokenizer/merges.txt"),
]


def link_duplicates(model_dir):
    """Replace each file of DUPLICATES that equals its original with a link to it."""
    for copy, original in DUPLICATES:
        path, target = os.path.join(model_dir, copy), os.path.join(model_dir, original)
        if os.path.islink(path) or not filecmp.cmp(path, target, shallow=False):
            continue
        os.remove(path)
        os.symlink(os.path.relpath(target, os.path.dirname(path)), path)


def versions():
    import diffusers
    import transformers

    return {
        "diffusers": diffusers.__version__,
        "numpy": np.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


class SchedulerNoise:
    """Stands in for diffusers' `randn_tensor` inside scheduler modules.

    Stochastic schedulers ask for step noise shaped like the batch of images; it is drawn from
    the same per-image streams as the initial latents, each stream continuing where it stopped.
    """

    def __init__(self, noise):
        self.noise = noise
        self.draws = 0

    def __call__(self, shape, generator=None, device=None, dtype=None, layout=None):
        self.draws += 1
        sample = torch.from_numpy(self.noise.sample(tuple(shape)))
        return sample.to(device=device or "cpu", dtype=dtype or torch.float32)


def build_scheduler(pipe, case):
    cls, kwargs = SCHEDULERS[case["scheduler"]]
    kwargs = dict(kwargs, **case.get("scheduler_overrides", {}))
    return cls.from_config(pipe.scheduler.config, **kwargs)


def _request(case):
    """The request fields as the manifest lists them (None where the pipeline default applies)."""
    keys = (
        "prompt",
        "prompt_2",
        "negative_prompt",
        "negative_prompt_2",
        "width",
        "height",
        "steps",
        "guidance_scale",
        "guidance_rescale",
        "scheduler",
        "scheduler_overrides",
        "seed",
        "num_images",
        "original_size",
        "crops_coords_top_left",
        "target_size",
    )
    defaults = {
        "prompt_2": None,
        "negative_prompt": None,
        "negative_prompt_2": None,
        "guidance_rescale": 0.0,
        "scheduler_overrides": {},
        "num_images": 1,
        "original_size": None,
        "crops_coords_top_left": None,
        "target_size": None,
    }
    request = {}
    for key in keys:
        value = case.get(key, defaults.get(key))
        request[key] = list(value) if isinstance(value, tuple) else value
    return request


def _write_f32(path, tensor):
    data = tensor.detach().to(torch.float32).contiguous().numpy().astype("<f4")
    with open(path, "wb") as f:
        f.write(data.tobytes())


def run_case(pipe, case, out_dir):
    req = _request(case)
    n = req["num_images"]
    factor = pipe.vae_scale_factor
    shape = (n, pipe.unet.config.in_channels, req["height"] // factor, req["width"] // factor)
    noise = BatchNoise([req["seed"] + i for i in range(n)])
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

    optional = {
        k: tuple(req[k])
        for k in ("original_size", "crops_coords_top_left", "target_size")
        if req[k] is not None
    }
    try:
        result = pipe(
            prompt=req["prompt"],
            prompt_2=req["prompt_2"],
            negative_prompt=req["negative_prompt"],
            negative_prompt_2=req["negative_prompt_2"],
            width=req["width"],
            height=req["height"],
            num_inference_steps=req["steps"],
            guidance_scale=req["guidance_scale"],
            guidance_rescale=req["guidance_rescale"],
            num_images_per_prompt=n,
            latents=init.clone(),
            output_type="pil",
            callback_on_step_end=keep_latents,
            callback_on_step_end_tensor_inputs=["latents"],
            **optional,
        )
    finally:
        if saved is not None:
            module.randn_tensor = saved

    name = case["name"]
    files = {"init_latents": f"{name}.init_latents.f32", "latents": f"{name}.latents.f32", "images": []}
    _write_f32(os.path.join(out_dir, files["init_latents"]), init)
    _write_f32(os.path.join(out_dir, files["latents"]), final["latents"])
    for i, image in enumerate(result.images):
        pixels = np.asarray(image, dtype=np.float64)
        std = float(pixels.reshape(-1, 3).std(axis=0).mean())
        if std < MIN_IMAGE_STD:
            raise RuntimeError(f"{name}: image {i} is nearly flat (std {std:.2f})")
        file = f"{name}.{i}.png"
        image.save(os.path.join(out_dir, file), format="PNG")
        files["images"].append(file)

    return {
        "name": name,
        "request": req,
        "scheduler_class": type(scheduler).__name__,
        "timesteps": [float(t) for t in scheduler.timesteps],
        "scheduler_noise_draws": step_noise.draws,
        "latent_shape": list(shape),
        **files,
    }


def make_pipeline_goldens(pipe, out_dir, log=print):
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.makedirs(out_dir)
    original = pipe.scheduler
    cases = []
    for case in CASES:
        log(f"case {case['name']}")
        cases.append(run_case(pipe, case, out_dir))
        pipe.scheduler = original
    manifest = {
        "description": (
            "diffusers StableDiffusionXLPipeline (PyTorch, float32, CPU) outputs of the tiny "
            "pipeline in tests/fixtures/tiny-sdxl, made by onnx/make_goldens.py"
        ),
        "model": "tests/fixtures/tiny-sdxl",
        "versions": versions(),
        "latent_format": "raw little-endian float32, row-major, shape latent_shape",
        "init_latents": (
            "standard normal noise from sdxl_noise.BatchNoise([seed + i for i in "
            "range(num_images)]), image-major, before scaling by the scheduler's init_noise_sigma"
        ),
        "latents": "the denoised latents after the last step, before division by scaling_factor",
        "images": (
            "8-bit RGB PNGs: vae_decoder(latents / scaling_factor), then (x / 2 + 0.5) clamped "
            "to [0, 1], times 255, rounded"
        ),
        "scheduler_noise": (
            "stochastic schedulers draw step noise shaped like latent_shape from the same "
            "per-image streams, continuing after the initial latents"
        ),
        "cases": cases,
    }
    with open(os.path.join(out_dir, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, ensure_ascii=False)
        f.write("\n")


def make_tokenizer_goldens(model_dir, out_dir, log=print):
    import tokenizers
    import transformers
    from transformers import CLIPTokenizer

    from golden_prompts import prompts

    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(model_dir, "tokenizer"))
    tokenizer_2 = CLIPTokenizer.from_pretrained(os.path.join(model_dir, "tokenizer_2"))

    os.makedirs(out_dir, exist_ok=True)
    entries = []
    for text in prompts():
        entry = {"prompt": text}
        for key, tok in (("tokenizer", tokenizer), ("tokenizer_2", tokenizer_2)):
            ids = tok(text, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
            entry[key] = ids
        entries.append(entry)
    doc = {
        "description": (
            "input_ids of tests/fixtures/tiny-sdxl/tokenizer and tokenizer_2 as diffusers calls "
            "them (padding=max_length, max_length=77, truncation=True), made by onnx/make_goldens.py"
        ),
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "max_length": tokenizer.model_max_length,
        "cases": entries,
    }
    # One case per line keeps the file small and its diffs readable.
    head = json.dumps({k: v for k, v in doc.items() if k != "cases"}, indent=1, ensure_ascii=False)
    lines = [json.dumps(entry, ensure_ascii=False) for entry in entries]
    with open(os.path.join(out_dir, "tokens.json"), "w", encoding="utf-8") as f:
        f.write(head[:-2] + ',\n "cases": [\n  ' + ",\n  ".join(lines) + "\n ]\n}\n")
    log(f"{len(entries)} tokenizer cases")


def main(argv=None):
    p = argparse.ArgumentParser(description="Regenerate the tiny SDXL export and the goldens.")
    p.add_argument("--repo", default=REPO, help="repository root")
    p.add_argument("--only", choices=("tiny", "pipeline", "tokenizer"), action="append")
    args = p.parse_args(argv)
    parts = set(args.only or ("tiny", "pipeline", "tokenizer"))

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    pipe = build_tiny_pipeline(SEED)
    pipe.set_progress_bar_config(disable=True)

    # The pipeline runs come first, so that `--only pipeline` and a full run start them from the
    # same process state: after the export and its checks, one decoded pixel of a batch-2 case
    # came out one step different.
    if "pipeline" in parts:
        make_pipeline_goldens(pipe, os.path.join(args.repo, PIPELINE_DIR))
    if "tiny" in parts:
        out = os.path.join(args.repo, TINY_DIR)
        if os.path.exists(out):
            shutil.rmtree(out)
        export_pipeline(pipe, out, controlnet_unet=True, compact=True)
        verify_export(pipe, out)
        link_duplicates(out)
    if "tokenizer" in parts:
        make_tokenizer_goldens(
            os.path.join(args.repo, TINY_DIR), os.path.join(args.repo, TOKENIZER_DIR)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Golden scheduler outputs from diffusers for tests/schedulers.rs.

Writes tests/fixtures/golden/schedulers/{timesteps,trajectories}.json:

* timesteps.json + timesteps.f32: for each case (scheduler kind, configuration changes, step
  count) the timesteps and sigmas diffusers lays out after `set_timesteps(steps)`, and
  `init_noise_sigma`; or the exception diffusers raises. Stored compactly: `timesteps.f32` holds
  every distinct list of values once, as little-endian float32; `timesteps.json` is the index.
  Its `arrays` lists each stored list as `[first value, count]`, and `groups` the cases sharing
  a kind and configuration changes (`kind`, `overrides`, `config`), each case as
  `[steps, timesteps array, sigmas array, init_noise_sigma]` or `[steps, error text]`.
* trajectories.json: the final latents of a whole denoising loop driven by a toy deterministic
  model, `0.8 * tanh(0.5 * scaled_input) + 0.05 * cos(t / 100)` in float32. The initial latents
  and any noise a stochastic scheduler draws come from the project's seeded generator
  (onnx/sdxl_noise.py, seeds [11, 12]), patched into diffusers in place of `randn_tensor`.

Every scheduler is built as the worker builds it: `Cls.from_config(base, **kind_kwargs,
**changes)`, where `base` is what `save_config` writes for SDXL base's EulerDiscreteScheduler.

Run with the project's Python: `/work/venv/bin/python onnx/golden_schedulers.py`.
"""

import importlib
import json
import os
import sys

import numpy as np
import torch

import diffusers
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LMSDiscreteScheduler,
    UniPCMultistepScheduler,
)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sdxl_noise import BatchNoise  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "golden", "schedulers")

KINDS = {
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {}),
    "dpmpp_2m_karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    "dpmpp_2m_sde": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++"}),
    "dpmpp_2m_sde_karras": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
    ),
    "unipc": (UniPCMultistepScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "lms": (LMSDiscreteScheduler, {}),
}

# Keys the worker accepts as per-request overrides; other changes patch the model's config.
OVERRIDE_KEYS = {"timestep_spacing", "steps_offset", "prediction_type", "use_karras_sigmas"}
SPACINGS = ["leading", "trailing", "linspace"]
SOME_STEPS = [1, 2, 3, 4, 7, 10, 13, 14, 15, 20, 25, 30, 50, 60]


def base_config():
    sched = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )
    return json.loads(sched.to_json_string())


def f32(x):
    """Shortest text that reads back as the same float32."""
    return float(str(np.float32(x)))


def build(base, kind, changes):
    cls, kind_kwargs = KINDS[kind]
    kwargs = dict(changes)
    kwargs.update(kind_kwargs)
    return cls.from_config(base, **kwargs)


def split(changes):
    overrides = {k: v for k, v in changes.items() if k in OVERRIDE_KEYS}
    config = {k: v for k, v in changes.items() if k not in OVERRIDE_KEYS}
    return overrides, config


def timestep_case(base, kind, changes, steps):
    overrides, config = split(changes)
    case = {"kind": kind, "overrides": overrides, "config": config, "steps": steps}
    try:
        sched = build(base, kind, changes)
        sched.set_timesteps(steps)
        sigmas = getattr(sched, "sigmas", None)
        # DDIM has no sigmas; the multistep solvers keep theirs as float32 tensors.
        case["timesteps"] = [f32(t) for t in sched.timesteps.tolist()]
        case["sigmas"] = [] if kind == "ddim" or sigmas is None else [f32(s) for s in sigmas.tolist()]
        case["init_noise_sigma"] = f32(float(sched.init_noise_sigma))
    except Exception as e:  # diffusers' own refusal is part of the golden
        case["error"] = f"{type(e).__name__}: {e}"
    return case


def timestep_cases(base):
    cases = []
    for kind in KINDS:
        for spacing in SPACINGS:
            for steps in range(1, 61):
                cases.append(timestep_case(base, kind, {"timestep_spacing": spacing}, steps))
    for kind in KINDS:
        for steps in SOME_STEPS:
            cases.append(timestep_case(base, kind, {"timestep_spacing": "leading", "steps_offset": 0}, steps))
    for kind in ["euler", "heun", "lms"]:
        for spacing in SPACINGS:
            for steps in range(1, 61):
                changes = {"timestep_spacing": spacing, "use_karras_sigmas": True}
                cases.append(timestep_case(base, kind, changes, steps))
    extras = [
        ("unipc", {"use_karras_sigmas": True}),
        ("unipc", {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min"}),
        ("unipc", {"final_sigmas_type": "sigma_min"}),
        ("dpmpp_2m", {"final_sigmas_type": "sigma_min"}),
        ("dpmpp_2m", {"lambda_min_clipped": -5.1}),
        ("dpmpp_2m_karras", {"beta_schedule": "squaredcos_cap_v2"}),
        ("euler", {"final_sigmas_type": "sigma_min"}),
        ("euler", {"interpolation_type": "log_linear"}),
        ("euler", {"timestep_type": "continuous", "prediction_type": "v_prediction"}),
        ("euler", {"use_karras_sigmas": True, "sigma_min": 0.1, "sigma_max": 10.0}),
        ("euler", {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}),
        ("heun", {"beta_schedule": "exp"}),
        ("ddim", {"set_alpha_to_one": False}),
    ]
    for kind in ["euler", "euler_a", "ddim", "dpmpp_2m", "unipc", "heun", "lms"]:
        extras.append((kind, {"beta_schedule": "squaredcos_cap_v2"}))
    for kind in ["euler", "euler_a", "ddim", "dpmpp_2m", "unipc"]:
        extras.append((kind, {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}))
    for kind, changes in extras:
        for steps in SOME_STEPS:
            cases.append(timestep_case(base, kind, changes, steps))
    return cases


def patch_randn(noise):
    def randn(shape, generator=None, device=None, dtype=None, layout=None):
        return torch.from_numpy(noise.sample(tuple(shape))).to(dtype or torch.float32)

    for name in dir(diffusers.schedulers):
        if name.startswith("scheduling_"):
            mod = importlib.import_module(f"diffusers.schedulers.{name}")
            if hasattr(mod, "randn_tensor"):
                mod.randn_tensor = randn


def toy_model(x, t):
    t = torch.as_tensor(t).to(torch.float32)
    return 0.8 * torch.tanh(0.5 * x) + 0.05 * torch.cos(t / 100)


def trajectory(base, kind, changes, steps):
    overrides, config = split(changes)
    sched = build(base, kind, changes)
    sched.set_timesteps(steps)
    noise = BatchNoise([11, 12])
    patch_randn(noise)
    latents = torch.from_numpy(noise.sample((2, 4, 8, 8))) * sched.init_noise_sigma
    for t in sched.timesteps:
        x = sched.scale_model_input(latents, t)
        out = toy_model(x, t)
        latents = sched.step(out, t, latents, return_dict=False)[0]
    return {
        "kind": kind,
        "class": type(sched).__name__,
        "overrides": overrides,
        "config": config,
        "steps": steps,
        "evaluations": len(sched.timesteps),
        "final": [f32(v) for v in latents.flatten().tolist()],
    }


def trajectory_cases(base):
    runs = []
    for kind in KINDS:
        for prediction in ["epsilon", "v_prediction"]:
            for steps in [10, 25]:
                for spacing in ["leading", "trailing"]:
                    changes = {"prediction_type": prediction, "timestep_spacing": spacing}
                    runs.append(trajectory(base, kind, changes, steps))
    extras = [
        ("ddim", {"clip_sample": False}),
        ("ddim", {"set_alpha_to_one": False, "timestep_spacing": "linspace"}),
        ("dpmpp_2m", {"solver_order": 3}),
        ("dpmpp_2m", {"solver_type": "heun"}),
        ("dpmpp_2m", {"euler_at_final": True, "lower_order_final": False}),
        ("dpmpp_2m_sde", {"solver_type": "heun"}),
        ("dpmpp_2m_sde", {"solver_order": 3}),
        ("dpmpp_2m_karras", {"timestep_spacing": "linspace"}),
        ("unipc", {"solver_order": 3}),
        # bh1 and noise prediction divide by zero at a zero final sigma in diffusers.
        ("unipc", {"solver_type": "bh1", "final_sigmas_type": "sigma_min"}),
        ("unipc", {"predict_x0": False, "final_sigmas_type": "sigma_min"}),
        ("unipc", {"use_karras_sigmas": True}),
        ("euler", {"use_karras_sigmas": True}),
        ("euler", {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"}),
        ("euler_a", {"timestep_spacing": "linspace"}),
        ("heun", {"use_karras_sigmas": True}),
        ("lms", {"use_karras_sigmas": True}),
        ("lms", {"timestep_spacing": "linspace"}),
    ]
    for kind, changes in extras:
        for steps in [10, 25]:
            runs.append(trajectory(base, kind, changes, steps))
    return runs


def compact_timesteps(cases):
    """The index and the float32 values of the compact timesteps golden (see the top)."""
    values, arrays, ids, groups, by_key = [], [], {}, [], {}

    def array_id(items):
        key = tuple(items)
        if key not in ids:
            ids[key] = len(arrays)
            arrays.append([len(values), len(items)])
            values.extend(items)
        return ids[key]

    for case in cases:
        key = json.dumps([case["kind"], case["overrides"], case["config"]], sort_keys=True)
        if key not in by_key:
            by_key[key] = {"kind": case["kind"], "overrides": case["overrides"], "config": case["config"], "cases": []}
            groups.append(by_key[key])
        if "error" in case:
            row = [case["steps"], case["error"]]
        else:
            row = [case["steps"], array_id(case["timesteps"]), array_id(case["sigmas"]), case["init_noise_sigma"]]
        by_key[key]["cases"].append(row)
    return {"values": "timesteps.f32", "arrays": arrays, "groups": groups}, values


def main():
    os.makedirs(OUT, exist_ok=True)
    base = base_config()
    meta = {"diffusers": diffusers.__version__, "torch": torch.__version__, "base_config": base}
    index, values = compact_timesteps(timestep_cases(base))
    with open(os.path.join(OUT, "timesteps.json"), "w") as f:
        json.dump(dict(meta, **index), f, separators=(",", ":"), allow_nan=False)
    with open(os.path.join(OUT, "timesteps.f32"), "wb") as f:
        f.write(np.asarray(values, dtype="<f4").tobytes())
    trajectories = dict(meta, seeds=[11, 12], shape=[2, 4, 8, 8], runs=trajectory_cases(base))
    with open(os.path.join(OUT, "trajectories.json"), "w") as f:
        json.dump(trajectories, f, separators=(",", ":"), allow_nan=False)
    for name in ["timesteps.json", "timesteps.f32", "trajectories.json"]:
        print(name, os.path.getsize(os.path.join(OUT, name)), "bytes")


if __name__ == "__main__":
    main()

"""The requests the pipeline goldens cover, and the schedulers by their project ids.

Each case lists request fields; absent ones take the pipeline defaults (see `make_goldens._request`).
Sizes are in pixels; the tiny pipeline's VAE scale factor is 4, so 64x64 means 16x16 latents.
"""

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LMSDiscreteScheduler,
    UniPCMultistepScheduler,
)

# Project scheduler id -> (diffusers class, keyword arguments on top of the pipeline's config).
SCHEDULERS = {
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

PROMPT = "a photograph of an astronaut riding a horse"
NEGATIVE = "blurry, low quality"
UNICODE_PROMPT = "café crème, 東京の夜景 🌃, naïve façade"
LONG_PROMPT = (
    "a highly detailed matte painting of an ancient city built into the side of a colossal "
    "waterfall at golden hour, intricate stone bridges, hanging gardens, flocks of white birds, "
    "volumetric light rays through the mist, tiny figures walking along the terraces, "
    "dramatic clouds, cinematic composition, ultra wide angle, trending on artstation, "
    "octane render, 8k resolution, sharp focus, vivid colors, masterpiece, award winning"
)

BASE = {
    "prompt": PROMPT,
    "negative_prompt": NEGATIVE,
    "width": 64,
    "height": 64,
    "steps": 8,
    "guidance_scale": 5.0,
    "seed": 42,
}


def _case(name, **fields):
    case = dict(BASE, name=name)
    case.update(fields)
    return case


def _cases():
    cases = [_case(f"{sid}_basic", scheduler=sid) for sid in SCHEDULERS]
    for sid in ("euler", "dpmpp_2m_karras"):
        cases += [
            _case(f"{sid}_empty_prompt", scheduler=sid, prompt="", negative_prompt=None, seed=3),
            _case(f"{sid}_unicode_prompt", scheduler=sid, prompt=UNICODE_PROMPT, seed=4),
            _case(f"{sid}_long_prompt", scheduler=sid, prompt=LONG_PROMPT, seed=5),
        ]
    cases += [
        _case(
            "euler_prompt_2",
            scheduler="euler",
            prompt_2="an oil painting in the style of van gogh",
            negative_prompt_2="cartoon, lowres",
            seed=6,
        ),
        _case("euler_negative_empty_string", scheduler="euler", negative_prompt="", seed=7),
        _case("euler_no_negative_prompt", scheduler="euler", negative_prompt=None, seed=7),
        _case("euler_two_images", scheduler="euler", num_images=2, seed=8),
        _case("euler_a_two_images", scheduler="euler_a", num_images=2, seed=8),
        _case("dpmpp_2m_sde_two_images", scheduler="dpmpp_2m_sde", num_images=2, seed=9),
        _case("euler_guidance_rescale", scheduler="euler", guidance_rescale=0.7, seed=10),
        _case("euler_no_cfg", scheduler="euler", guidance_scale=1.0, seed=11),
        _case("dpmpp_2m_no_cfg", scheduler="dpmpp_2m", guidance_scale=1.0, seed=11),
    ]
    for sid in ("euler", "dpmpp_2m"):
        for spacing in ("trailing", "linspace"):
            cases.append(
                _case(
                    f"{sid}_{spacing}",
                    scheduler=sid,
                    scheduler_overrides={"timestep_spacing": spacing},
                    seed=12,
                )
            )
    for sid in ("euler", "ddim"):
        cases.append(
            _case(
                f"{sid}_v_prediction_trailing",
                scheduler=sid,
                scheduler_overrides={"timestep_spacing": "trailing", "prediction_type": "v_prediction"},
                seed=13,
            )
        )
    cases += [
        _case(
            "euler_non_square_micro_conditioning",
            scheduler="euler",
            width=64,
            height=96,
            original_size=(200, 150),
            crops_coords_top_left=(12, 4),
            target_size=(80, 72),
            seed=14,
        ),
        _case("dpmpp_2m_karras_non_square", scheduler="dpmpp_2m_karras", width=96, height=64, seed=15),
        _case("euler_large_seed", scheduler="euler", seed=2**63 + 5),
        _case("euler_a_large_seed", scheduler="euler_a", seed=2**63 + 5),
        _case("euler_a_seed_wraps", scheduler="euler_a", num_images=2, seed=2**64 - 1),
        _case("euler_seed_zero", scheduler="euler", seed=0),
        _case("euler_20_steps", scheduler="euler", steps=20, seed=16),
    ]
    names = [c["name"] for c in cases]
    if len(set(names)) != len(names):
        raise ValueError("duplicate golden case names")
    return cases


CASES = _cases()

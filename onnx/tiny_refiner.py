"""A tiny SDXL refiner with seeded random weights, for tests.

It has the structure of stable-diffusion-xl-refiner-1.0: a `StableDiffusionXLImg2ImgPipeline`
with no first text encoder (`text_encoder=None`, `tokenizer=None`), `requires_aesthetics_score`
(its UNet takes five time ids: original size, crop, aesthetic score) and a UNet whose
cross-attention width is the second encoder's hidden size.

It shares the tiny base pipeline's (`tiny_sdxl.py`) `text_encoder_2`, `tokenizer_2` and VAE, as the
real refiner shares the base's VAE and OpenCLIP encoder, so that its fixture can link those
components instead of storing them twice. Its UNet is smaller than the base's and has its own
seed. Its scheduler configuration differs from the base's on purpose (`trailing` timestep
spacing), so that a refiner that reused the base's schedule would fail the parity tests.
"""

import torch

from tiny_sdxl import SCHEDULER, SEED, TEXT_ENCODER_2, _reinit, build_tiny_pipeline

REFINER_SEED = 20261129

UNET = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(16, 32),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4),
    transformer_layers_per_block=1,
    cross_attention_dim=TEXT_ENCODER_2["hidden_size"],
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    # 5 time ids of 8 features, then the pooled embedding of text_encoder_2.
    projection_class_embeddings_input_dim=5 * 8 + TEXT_ENCODER_2["projection_dim"],
    use_linear_projection=True,
    norm_num_groups=8,
)

SCHEDULER_CONFIG = dict(SCHEDULER, timestep_spacing="trailing", steps_offset=0)


def build_tiny_refiner(seed=REFINER_SEED, base=None):
    """The tiny refiner, sharing `base`'s (the tiny pipeline of `tiny_sdxl.SEED`) second encoder,
    second tokenizer and VAE."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline, UNet2DConditionModel

    if base is None:
        base = build_tiny_pipeline(SEED)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    unet = UNet2DConditionModel(**UNET)
    _reinit(unet, generator)
    unet.eval()
    return StableDiffusionXLImg2ImgPipeline(
        vae=base.vae,
        text_encoder=None,
        text_encoder_2=base.text_encoder_2,
        tokenizer=None,
        tokenizer_2=base.tokenizer_2,
        unet=unet,
        scheduler=EulerDiscreteScheduler(**SCHEDULER_CONFIG),
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
        add_watermarker=False,
    )

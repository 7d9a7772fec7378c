"""Tiny SDXL ControlNets with seeded random weights, matching the tiny SDXL UNet (`tiny_sdxl.py`).

A ControlNet's residuals are added to the UNet's skip connections, so it must have the UNet's
down-block channel layout (block_out_channels (32, 64), one layer per block: five residuals of
32, 32, 32, 64 and 64 channels, plus a 64-channel mid residual); everything else may be smaller.
Both have no attention in the mid block and a small conditioning embedding whose three levels
downsample a control image by 4, the tiny VAE's scale factor. `canny` has a cross-attention down
block like the UNet; `depth` has plain down blocks only, so the two differ in structure.

Every weight is rounded to a float16 value (the model still computes in float32), so the
exports can store float16 initializers and stay small.
"""

import torch

from tiny_sdxl import SEED, UNET, _reinit

_COMMON = dict(
    in_channels=UNET["in_channels"],
    conditioning_channels=3,
    block_out_channels=UNET["block_out_channels"],
    layers_per_block=UNET["layers_per_block"],
    cross_attention_dim=UNET["cross_attention_dim"],
    addition_embed_type="text_time",
    addition_time_embed_dim=UNET["addition_time_embed_dim"],
    projection_class_embeddings_input_dim=UNET["projection_class_embeddings_input_dim"],
    use_linear_projection=True,
    norm_num_groups=UNET["norm_num_groups"],
    attention_head_dim=UNET["attention_head_dim"],
    transformer_layers_per_block=(1, 1),
    mid_block_type="UNetMidBlock2D",
    conditioning_embedding_out_channels=(4, 8, 16),
)

CONTROLNETS = {
    "canny": dict(_COMMON, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D")),
    "depth": dict(_COMMON, down_block_types=("DownBlock2D", "DownBlock2D")),
}

# Offsets from the pipeline seed, so that each ControlNet gets its own weights.
_SEED_OFFSET = {"canny": 1, "depth": 2}


def build_tiny_controlnet(kind, seed=SEED):
    """The tiny ControlNet `kind` ("canny" or "depth"), identical for the same seed."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed + _SEED_OFFSET[kind])
    generator = torch.Generator().manual_seed(seed + _SEED_OFFSET[kind])
    model = ControlNetModel(**CONTROLNETS[kind])
    _reinit(model, generator)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    return model.eval()

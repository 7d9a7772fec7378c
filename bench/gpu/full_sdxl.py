"""The full-size SDXL base pipeline with random weights, built from its published configuration.

The shapes are those of `stabilityai/stable-diffusion-xl-base-1.0` (UNet 2.6 B parameters, CLIP
ViT-L and OpenCLIP bigG text encoders, the 4-level VAE), so every kernel runs at the real size;
the weights are drawn from a seeded generator (scaled so that activations keep unit variance and
float16 does not overflow), because the benchmark host cannot download checkpoints. Speed does
not depend on the values of the weights. The tokenizers are the repository's CLIP tokenizer files
(tests/fixtures/tiny-sdxl), which carry the real CLIP vocabulary.
"""

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "onnx"))

from tiny_sdxl import SCHEDULER, _reinit  # noqa: E402  (the same scheduler and weight draws)

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
TOKENIZERS = os.path.join(REPO, "tests", "fixtures", "tiny-sdxl")
SEED = 20261128

UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10),
    cross_attention_dim=2048,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    use_linear_projection=True,
    norm_num_groups=32,
)

TEXT_ENCODER = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
)

TEXT_ENCODER_2 = dict(
    vocab_size=49408,
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    max_position_embeddings=77,
    hidden_act="gelu",
    projection_dim=1280,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
)

VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=0.13025,
    force_upcast=True,
)

def build(device="cuda", seed=SEED):
    """The fp32 pipeline on `device`, identical for a given seed on a given device."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
    )

    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.device(device):
        text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_ENCODER_2))
        unet = UNet2DConditionModel(**UNET)
        vae = AutoencoderKL(**VAE)
    for module in (text_encoder, text_encoder_2, unet, vae):
        _reinit(module, generator)
        module.eval()
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=CLIPTokenizer.from_pretrained(os.path.join(TOKENIZERS, "tokenizer")),
        tokenizer_2=CLIPTokenizer.from_pretrained(os.path.join(TOKENIZERS, "tokenizer_2")),
        unet=unet,
        scheduler=EulerDiscreteScheduler(**SCHEDULER),
        add_watermarker=False,
    )


def build_controlnet(unet, seed=SEED + 1):
    """A full-size SDXL ControlNet for `unet` (the layout of diffusers/controlnet-canny-sdxl-1.0:
    the UNet's down and mid blocks plus a conditioning embedding), on the UNet's device, with its
    weights drawn from the seeded generator. `ControlNetModel.from_unet` alone would copy the
    UNet's weights and leave the residual convolutions zero, so every residual would be zero."""
    from diffusers import ControlNetModel

    with torch.device(unet.device):
        controlnet = ControlNetModel.from_unet(unet, load_weights_from_unet=False)
    _reinit(controlnet, torch.Generator(device=unet.device).manual_seed(seed))
    return controlnet.eval()

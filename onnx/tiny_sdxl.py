"""A tiny SDXL pipeline with seeded random weights, for tests.

It has the structure of Stable Diffusion XL base (two CLIP text encoders, a UNet with
`text_time` conditioning, an AutoencoderKL, Euler discrete scheduling) at a size that runs in
milliseconds. The shapes differ on purpose from one another and from the real model, so that a
loader that assumes SDXL's sizes fails its tests: the text encoders have hidden sizes 16 and 32,
the UNet's cross-attention width is 48 and the VAE downsamples by 4, not 8.

The tokenizers are real CLIP tokenizers built from CLIP's own BPE merges (see `clip_vocab.py`).
"""

import math
import tempfile

import torch

from clip_vocab import EOS, VOCAB_SIZE, write_clip_tokenizer

SEED = 20261128

TEXT_ENCODER = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=16,
    intermediate_size=40,
    num_hidden_layers=5,
    num_attention_heads=4,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=16,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
)

TEXT_ENCODER_2 = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=32,
    intermediate_size=72,
    num_hidden_layers=6,
    num_attention_heads=4,
    max_position_embeddings=77,
    hidden_act="gelu",
    projection_dim=32,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
)

UNET = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4),
    transformer_layers_per_block=(1, 2),
    cross_attention_dim=48,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=80,
    use_linear_projection=True,
    norm_num_groups=8,
)

VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(8, 16, 16),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
    sample_size=64,
    scaling_factor=0.13025,
    force_upcast=True,
)

SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    steps_offset=1,
    timestep_spacing="leading",
    prediction_type="epsilon",
    interpolation_type="linear",
    use_karras_sigmas=False,
)


def _reinit(module, generator):
    """Draw every parameter again from the seeded generator.

    Weights get a normal draw scaled by 1/sqrt(fan_in) (unit-variance activations through each
    layer); biases and normalisation offsets get small values, normalisation scales stay near 1.
    The draws happen on the parameters' device, with a generator on that device.
    """
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            leaf = name.rsplit(".", 1)[-1]
            draw = lambda: torch.randn(p.shape, generator=generator, device=p.device)  # noqa: E731
            if p.dim() >= 2:
                fan_in = p[0].numel()
                p.copy_(draw() / math.sqrt(fan_in))
            elif leaf == "weight":
                p.copy_(1.0 + 0.1 * draw())
            else:
                p.copy_(0.05 * draw())


def build_tiny_pipeline(seed=SEED):
    """The tiny SDXL pipeline, identical for the same seed and library versions."""
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

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)

    text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_ENCODER_2))
    unet = UNet2DConditionModel(**UNET)
    vae = AutoencoderKL(**VAE)
    for module in (text_encoder, text_encoder_2, unet, vae):
        _reinit(module, generator)
        module.eval()

    with tempfile.TemporaryDirectory() as tmp:
        write_clip_tokenizer(f"{tmp}/tokenizer", EOS)
        write_clip_tokenizer(f"{tmp}/tokenizer_2", "!")
        tokenizer = CLIPTokenizer.from_pretrained(f"{tmp}/tokenizer")
        tokenizer_2 = CLIPTokenizer.from_pretrained(f"{tmp}/tokenizer_2")

    scheduler = EulerDiscreteScheduler(**SCHEDULER)
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )

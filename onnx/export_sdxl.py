"""Export a diffusers Stable Diffusion XL pipeline to the Optimum ONNX layout.

The output directory has the layout `optimum-cli export onnx --task text-to-image` writes:

    model_index.json
    text_encoder/{model.onnx,config.json}
    text_encoder_2/{model.onnx,config.json}
    unet/{model.onnx,model.onnx_data,config.json}     (external weights when large)
    vae_decoder/{model.onnx,config.json}
    vae_encoder/{model.onnx,config.json}
    tokenizer/ and tokenizer_2/{vocab.json,merges.txt,tokenizer_config.json,special_tokens_map.json}
    scheduler/scheduler_config.json

A refiner (`StableDiffusionXLImg2ImgPipeline` with `requires_aesthetics_score`, such as
stable-diffusion-xl-refiner-1.0) has no `text_encoder/` and `tokenizer/`: `model_index.json` lists
them as `[null, null]`, and its UNet takes five time ids (the aesthetic score replaces the target
size). The exporter writes whichever components the pipeline has.

The source is a diffusers pipeline (`--model` hub id or local directory) or, with `--tiny`, the
seeded tiny test pipeline from `tiny_sdxl.py`. `--optimize` additionally fuses the graphs with
ONNX Runtime's transformer optimizer and converts them to float16 for the CUDA execution provider.
See README.md for the inputs and outputs of every component.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile

import onnx
import torch

from clip_vocab import save_tokenizer_files

DEFAULT_OPSET = 17
# A protobuf cannot exceed 2 GiB; above this size weights go to `model.onnx_data`.
EXTERNAL_DATA_THRESHOLD = 1 << 30
EXTERNAL_DATA_NAME = "model.onnx_data"


class TextEncoderExport(torch.nn.Module):
    """CLIP text encoder returning every hidden state, flattened for ONNX.

    `text_encoder` (CLIPTextModel) gives last_hidden_state, pooler_output, hidden_states.*;
    `text_encoder_2` (CLIPTextModelWithProjection) gives text_embeds, last_hidden_state,
    hidden_states.*.
    """

    def __init__(self, model, with_projection):
        super().__init__()
        self.model = model
        self.with_projection = with_projection

    def forward(self, input_ids):
        out = self.model(input_ids=input_ids, output_hidden_states=True, return_dict=True)
        first = out.text_embeds if self.with_projection else out.last_hidden_state
        second = out.last_hidden_state if self.with_projection else out.pooler_output
        return (first, second, *out.hidden_states)


class UNetExport(torch.nn.Module):
    """SDXL UNet with its added conditioning passed as plain inputs."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids):
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.unet(
            sample, timestep, encoder_hidden_states, added_cond_kwargs=added, return_dict=False
        )[0]


class VaeDecoderExport(torch.nn.Module):
    """VAE decoder on raw latents: the caller divides by `scaling_factor` first."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return self.vae.decode(latent_sample, return_dict=False)[0]


class VaeEncoderExport(torch.nn.Module):
    """VAE encoder returning the Gaussian's mean and log-variance stacked on channels."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, sample):
        return self.vae.encode(sample, return_dict=False)[0].parameters


def _export(module, args, path, input_names, output_names, dynamic_axes, opset, external=None):
    """Trace `module` to `path`, keeping weights inline unless the model is too large (or
    `external` says otherwise)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(path)) as tmp:
        raw = os.path.join(tmp, "model.onnx")
        with torch.no_grad():
            torch.onnx.export(
                module,
                args,
                raw,
                input_names=input_names,
                output_names=output_names,
                dynamic_axes=dynamic_axes,
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
        model = onnx.load(raw)
        save_model(model, path, external)


def save_model(model, path, external=None, data_name=EXTERNAL_DATA_NAME):
    """Save `model` to `path`, with weights in `data_name` (`model.onnx_data`) beside it when
    large (or always with `external=True`)."""
    for stale in (path, os.path.join(os.path.dirname(path), data_name)):
        if os.path.exists(stale):
            os.remove(stale)
    if external is None:
        size = sum(len(t.raw_data) for t in model.graph.initializer)
        external = size > EXTERNAL_DATA_THRESHOLD
    onnx.save_model(
        model,
        path,
        save_as_external_data=external,
        all_tensors_to_one_file=True,
        location=data_name,
        size_threshold=1024,
    )


def _batch_seq(names):
    return {n: {0: "batch_size", 1: "sequence_length"} for n in names}


def export_text_encoder(model, out_dir, with_projection, opset):
    model = model.eval().float()
    seq = model.config.max_position_embeddings
    input_ids = torch.zeros((2, seq), dtype=torch.int64)
    hidden = [f"hidden_states.{i}" for i in range(model.config.num_hidden_layers + 1)]
    if with_projection:
        outputs = ["text_embeds", "last_hidden_state", *hidden]
        dynamic = {"text_embeds": {0: "batch_size"}, **_batch_seq(["last_hidden_state", *hidden])}
    else:
        outputs = ["last_hidden_state", "pooler_output", *hidden]
        dynamic = {"pooler_output": {0: "batch_size"}, **_batch_seq(["last_hidden_state", *hidden])}
    dynamic.update(_batch_seq(["input_ids"]))
    _export(
        TextEncoderExport(model, with_projection),
        (input_ids,),
        os.path.join(out_dir, "model.onnx"),
        ["input_ids"],
        outputs,
        dynamic,
        opset,
    )
    model.config.save_pretrained(out_dir)


def time_ids_width(unet, text_embeds_dim):
    """Values per row of `time_ids`: 6 for a base UNet, 5 for a refiner's (the added embedding
    takes `addition_time_embed_dim` features per time id after the pooled text embedding)."""
    total = unet.config.projection_class_embeddings_input_dim
    per_id = unet.config.addition_time_embed_dim
    width, rest = divmod(total - text_embeds_dim, per_id)
    if rest or width not in (5, 6):
        raise ValueError(
            f"the UNet's added embedding ({total}) is not {per_id} per time id plus {text_embeds_dim}"
        )
    return width


def export_unet(unet, out_dir, text_embeds_dim, opset, external=None):
    unet = unet.eval().float()
    size = unet.config.sample_size
    size = size if isinstance(size, int) else size[0]
    args = (
        torch.randn(2, unet.config.in_channels, size, size),
        torch.tensor(999.0, dtype=torch.float32),
        torch.randn(2, 77, unet.config.cross_attention_dim),
        torch.randn(2, text_embeds_dim),
        torch.randn(2, time_ids_width(unet, text_embeds_dim)),
    )
    spatial = {0: "batch_size", 2: "height", 3: "width"}
    _export(
        UNetExport(unet),
        args,
        os.path.join(out_dir, "model.onnx"),
        ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"],
        ["out_sample"],
        {
            "sample": spatial,
            "encoder_hidden_states": {0: "batch_size", 1: "sequence_length"},
            "text_embeds": {0: "batch_size"},
            "time_ids": {0: "batch_size"},
            "out_sample": spatial,
        },
        opset,
        external,
    )
    unet.save_config(out_dir)


def vae_scale_factor(vae):
    return 2 ** (len(vae.config.block_out_channels) - 1)


def export_vae(vae, decoder_dir, encoder_dir, latent_size, opset):
    vae = vae.eval().float()
    factor = vae_scale_factor(vae)
    spatial = {0: "batch_size", 2: "height", 3: "width"}
    latent_spatial = {0: "batch_size", 2: "height_latent", 3: "width_latent"}
    latent = torch.randn(1, vae.config.latent_channels, latent_size, latent_size)
    _export(
        VaeDecoderExport(vae),
        (latent,),
        os.path.join(decoder_dir, "model.onnx"),
        ["latent_sample"],
        ["sample"],
        {"latent_sample": latent_spatial, "sample": spatial},
        opset,
    )
    vae.save_config(decoder_dir)
    image = torch.randn(1, vae.config.in_channels, latent_size * factor, latent_size * factor)
    _export(
        VaeEncoderExport(vae),
        (image,),
        os.path.join(encoder_dir, "model.onnx"),
        ["sample"],
        ["latent_parameters"],
        {"sample": spatial, "latent_parameters": latent_spatial},
        opset,
    )
    vae.save_config(encoder_dir)


def export_pipeline(pipe, out_dir, opset=DEFAULT_OPSET, log=print, controlnet_unet=False, compact=False):
    """Write the fp32 ONNX layout of `pipe` (a StableDiffusionXLPipeline, or a refiner
    StableDiffusionXLImg2ImgPipeline without `text_encoder`) to `out_dir`; with
    `controlnet_unet`, also `unet/model_controlnet.onnx` (see export_controlnet.py), sharing the
    UNet's external weights (`compact` shortens that graph's internal names)."""
    os.makedirs(out_dir, exist_ok=True)
    pipe.save_config(out_dir)
    if pipe.text_encoder is not None:
        log("text_encoder")
        export_text_encoder(pipe.text_encoder, os.path.join(out_dir, "text_encoder"), False, opset)
    log("text_encoder_2")
    export_text_encoder(pipe.text_encoder_2, os.path.join(out_dir, "text_encoder_2"), True, opset)
    log("unet")
    text_embeds_dim = pipe.text_encoder_2.config.projection_dim
    unet_dir = os.path.join(out_dir, "unet")
    export_unet(pipe.unet, unet_dir, text_embeds_dim, opset, True if controlnet_unet else None)
    if controlnet_unet:
        from export_controlnet import export_unet_variant

        log("unet (ControlNet residual variant)")
        export_unet_variant(pipe.unet, unet_dir, text_embeds_dim, opset, compact)
    log("vae_decoder, vae_encoder")
    size = pipe.unet.config.sample_size
    latent_size = size if isinstance(size, int) else size[0]
    export_vae(
        pipe.vae,
        os.path.join(out_dir, "vae_decoder"),
        os.path.join(out_dir, "vae_encoder"),
        latent_size,
        opset,
    )
    if pipe.tokenizer is not None:
        save_tokenizer_files(pipe.tokenizer, os.path.join(out_dir, "tokenizer"))
    save_tokenizer_files(pipe.tokenizer_2, os.path.join(out_dir, "tokenizer_2"))
    pipe.scheduler.save_config(os.path.join(out_dir, "scheduler"))


def load_pipeline(model):
    """The SDXL pipeline at `model`, of the class its `model_index.json` names (a base
    StableDiffusionXLPipeline or a refiner StableDiffusionXLImg2ImgPipeline)."""
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(model, torch_dtype=torch.float32, add_watermarker=False)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="diffusers SDXL pipeline: hub id or local directory")
    source.add_argument("--tiny", action="store_true", help="the seeded tiny test pipeline")
    source.add_argument(
        "--tiny-refiner", action="store_true", help="the seeded tiny test refiner (tiny_refiner.py)"
    )
    p.add_argument("--seed", type=int, default=None, help="weight seed for --tiny")
    p.add_argument("--output", required=True, help="output directory (replaced if it exists)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    p.add_argument(
        "--optimize",
        action="store_true",
        help="fuse with onnxruntime.transformers and convert to float16 (CUDA execution provider)",
    )
    p.add_argument(
        "--verify",
        action="store_true",
        help="compare every fp32 component with PyTorch in ONNX Runtime (CPU) after exporting",
    )
    p.add_argument(
        "--controlnet-unet",
        action="store_true",
        help="also write unet/model_controlnet.onnx, the UNet taking ControlNet residuals",
    )
    p.add_argument(
        "--fp16-vae",
        action="store_true",
        help="with --optimize, also convert the VAE to float16 (only for an fp16-safe VAE)",
    )
    args = p.parse_args(argv)
    if args.seed is not None and not (args.tiny or args.tiny_refiner):
        p.error("--seed only applies to --tiny and --tiny-refiner")
    if args.fp16_vae and not args.optimize:
        p.error("--fp16-vae only applies to --optimize")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.tiny:
        from tiny_sdxl import SEED, build_tiny_pipeline

        pipe = build_tiny_pipeline(SEED if args.seed is None else args.seed)
    elif args.tiny_refiner:
        from tiny_refiner import REFINER_SEED, build_tiny_refiner

        pipe = build_tiny_refiner(REFINER_SEED if args.seed is None else args.seed)
    else:
        pipe = load_pipeline(args.model)

    out = os.path.abspath(args.output)
    if os.path.exists(out):
        shutil.rmtree(out)
    if not args.optimize:
        export_pipeline(pipe, out, args.opset, controlnet_unet=args.controlnet_unet)
        if args.verify:
            from verify_export import verify_export

            verify_export(pipe, out)
        return 0

    from optimize_sdxl import optimize_export

    staging = tempfile.mkdtemp(prefix="sdxl-fp32-", dir=os.path.dirname(out))
    try:
        export_pipeline(pipe, staging, args.opset, controlnet_unet=args.controlnet_unet)
        if args.verify:
            from verify_export import verify_export

            verify_export(pipe, staging)
        del pipe
        report = optimize_export(staging, out, fp16_vae=args.fp16_vae)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(json.dumps(report, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())

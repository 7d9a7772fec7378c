"""Export SDXL ControlNets, and the SDXL UNet variant that takes ControlNet residuals, to ONNX.

    # a diffusers ControlNetModel (hub id or local directory) to controlnet/model.onnx
    python onnx/export_controlnet.py --model diffusers/controlnet-canny-sdxl-1.0 --output models/controlnet-canny
    # the same, fused and in float16 for the CUDA execution provider (optimize_sdxl.py)
    python onnx/export_controlnet.py --model diffusers/controlnet-canny-sdxl-1.0 --output models/controlnet-canny --optimize

    # add unet/model_controlnet.onnx to an SDXL export made by export_sdxl.py
    python onnx/export_controlnet.py --unet-of stabilityai/stable-diffusion-xl-base-1.0 --output models/sdxl-base

A ControlNet export is a directory with `model.onnx` (weights in `model.onnx_data` beside it when
large) and the ControlNetModel's `config.json`:

    inputs   sample T [B,4,H,W], timestep T [] (rank 0), encoder_hidden_states T [B,S,D],
             controlnet_cond T [B,3,H*f,W*f] (RGB in [0, 1]), text_embeds T [B,P], time_ids T [B,6]
    outputs  down_block_res_sample_0 .. down_block_res_sample_{N-1}, mid_block_res_sample

The residuals are unscaled (`conditioning_scale` 1, no guess mode): the caller multiplies them
by the conditioning scale, or in guess mode by diffusers' `logspace(-1, 0, N + 1) * scale`.

The UNet variant `unet/model_controlnet.onnx` has the inputs of `unet/model.onnx` plus
`down_block_additional_residual_0 .. _{N-1}` (the shapes of the ControlNet's down outputs) and
`mid_block_additional_residual`, added where diffusers adds them. It stores no weights of its
own: its initializers point into the plain UNet's `model.onnx_data` (matched by content), so the
directory holds one copy of the weights and either graph can be loaded. The fused float16
export (`export_sdxl.py --optimize --controlnet-unet`) keeps the variant's fused weights in
`unet/model_controlnet.onnx_data`; the engine then loads only the variant.
"""

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile

import onnx
import torch
from onnx import numpy_helper

from export_sdxl import DEFAULT_OPSET, EXTERNAL_DATA_NAME, save_model

UNET_VARIANT = "model_controlnet.onnx"


class ControlNetExport(torch.nn.Module):
    """An SDXL ControlNetModel returning its unscaled residuals as flat outputs."""

    def __init__(self, controlnet):
        super().__init__()
        self.controlnet = controlnet

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond, text_embeds, time_ids):
        down, mid = self.controlnet(
            sample,
            timestep,
            encoder_hidden_states,
            controlnet_cond,
            conditioning_scale=1.0,
            guess_mode=False,
            added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids},
            return_dict=False,
        )
        return (*down, mid)


class UNetResidualExport(torch.nn.Module):
    """SDXL UNet taking the ControlNet residuals as plain inputs after the usual five."""

    def __init__(self, unet, down_count):
        super().__init__()
        self.unet = unet
        self.down_count = down_count

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids, *residuals):
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.unet(
            sample,
            timestep,
            encoder_hidden_states,
            added_cond_kwargs=added,
            down_block_additional_residuals=list(residuals[: self.down_count]),
            mid_block_additional_residual=residuals[self.down_count],
            return_dict=False,
        )[0]


def down_names(n, prefix):
    return [f"{prefix}_{i}" for i in range(n)]


def residual_shapes(unet_config, batch, height, width):
    """The (channels, height, width) of each down residual and of the mid residual."""
    channels = list(unet_config.block_out_channels)
    layers = unet_config.layers_per_block
    shapes = [(channels[0], height, width)]
    h, w = height, width
    for i, ch in enumerate(channels):
        shapes += [(ch, h, w)] * layers
        if i < len(channels) - 1:
            h, w = (h + 1) // 2, (w + 1) // 2
            shapes.append((ch, h, w))
    return [(batch, *s) for s in shapes], (batch, channels[-1], h, w)


def _trace(module, args, path, input_names, output_names, dynamic_axes, opset):
    with torch.no_grad():
        torch.onnx.export(
            module,
            args,
            path,
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    return onnx.load(path)


def _store_float16(model):
    """Keep float32 initializers as float16 followed by a Cast (for test fixtures whose weights
    are exactly representable in float16): the graph still computes in float32."""
    graph = model.graph
    casts = []
    for init in graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT:
            continue
        array = numpy_helper.to_array(init)
        half = array.astype("float16")
        if not (half.astype("float32") == array).all():
            raise ValueError(f"{init.name} is not exactly representable in float16")
        name = init.name
        init.CopyFrom(numpy_helper.from_array(half, name + "_f16"))
        casts.append(onnx.helper.make_node("Cast", [name + "_f16"], [name], to=onnx.TensorProto.FLOAT))
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(casts + nodes)


def export_controlnet(controlnet, out_dir, text_embeds_dim, vae_factor, opset=DEFAULT_OPSET, float16_storage=False):
    """Write `out_dir/model.onnx` and `config.json` for a diffusers SDXL ControlNetModel."""
    controlnet = controlnet.eval().float()
    cfg = controlnet.config
    size = 16
    down_shapes, _ = residual_shapes(cfg, 2, size, size)
    args = (
        torch.randn(2, cfg.in_channels, size, size),
        torch.tensor(999.0, dtype=torch.float32),
        torch.randn(2, 77, cfg.cross_attention_dim),
        torch.rand(2, cfg.conditioning_channels, size * vae_factor, size * vae_factor),
        torch.randn(2, text_embeds_dim),
        torch.randn(2, 6),
    )
    spatial = {0: "batch_size", 2: "height", 3: "width"}
    downs = down_names(len(down_shapes), "down_block_res_sample")
    outputs = [*downs, "mid_block_res_sample"]
    dynamic = {
        "sample": spatial,
        "encoder_hidden_states": {0: "batch_size", 1: "sequence_length"},
        "controlnet_cond": {0: "batch_size", 2: "image_height", 3: "image_width"},
        "text_embeds": {0: "batch_size"},
        "time_ids": {0: "batch_size"},
    }
    for name in outputs:
        dynamic[name] = {0: "batch_size", 2: f"{name}_height", 3: f"{name}_width"}
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        model = _trace(
            ControlNetExport(controlnet),
            args,
            os.path.join(tmp, "model.onnx"),
            ["sample", "timestep", "encoder_hidden_states", "controlnet_cond", "text_embeds", "time_ids"],
            outputs,
            dynamic,
            opset,
        )
    if float16_storage:
        _store_float16(model)
        compact_names(model)
    save_model(model, os.path.join(out_dir, "model.onnx"))
    controlnet.save_config(out_dir)


def compact_names(model):
    """Give every internal value and initializer a short name and drop node names: the graph
    computes the same, and a small model's file shrinks by half (used for the test fixtures)."""
    graph = model.graph
    keep = {v.name for v in graph.input} | {v.name for v in graph.output}
    renamed = {}

    def short(name):
        if not name or name in keep:
            return name
        if name not in renamed:
            renamed[name] = f"v{len(renamed)}"
        return renamed[name]

    for init in graph.initializer:
        init.name = short(init.name)
    for node in graph.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise ValueError(f"{node.op_type} has a subgraph; compact_names does not handle those")
        node.name = ""
        node.doc_string = ""
        node.input[:] = [short(n) for n in node.input]
        node.output[:] = [short(n) for n in node.output]
    del graph.value_info[:]


def _digest(tensor):
    array = numpy_helper.to_array(tensor)
    return (tensor.data_type, tuple(tensor.dims), hashlib.sha256(array.tobytes()).hexdigest())


def export_unet_variant(unet, unet_dir, text_embeds_dim, opset=DEFAULT_OPSET, compact=False):
    """Write `unet_dir/model_controlnet.onnx`, pointing into the weights of `unet_dir/model.onnx`.

    `compact` shortens internal names (see `compact_names`). The plain UNet must have been saved with external data (`export_sdxl.py` does so when the
    variant is asked for); the variant's initializers are matched to its tensors by content.
    """
    unet = unet.eval().float()
    cfg = unet.config
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    down_shapes, mid_shape = residual_shapes(cfg, 2, size, size)
    residuals = [torch.randn(*s) for s in down_shapes] + [torch.randn(*mid_shape)]
    args = (
        torch.randn(2, cfg.in_channels, size, size),
        torch.tensor(999.0, dtype=torch.float32),
        torch.randn(2, 77, cfg.cross_attention_dim),
        torch.randn(2, text_embeds_dim),
        torch.randn(2, 6),
        *residuals,
    )
    downs = down_names(len(down_shapes), "down_block_additional_residual")
    names = ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids", *downs, "mid_block_additional_residual"]
    spatial = {0: "batch_size", 2: "height", 3: "width"}
    dynamic = {
        "sample": spatial,
        "encoder_hidden_states": {0: "batch_size", 1: "sequence_length"},
        "text_embeds": {0: "batch_size"},
        "time_ids": {0: "batch_size"},
        "out_sample": spatial,
    }
    for name in names[5:]:
        dynamic[name] = {0: "batch_size", 2: f"{name}_height", 3: f"{name}_width"}

    plain_path = os.path.join(unet_dir, "model.onnx")
    plain = onnx.load(plain_path, load_external_data=False)
    external = {}
    for init in plain.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            entries = {e.key: e.value for e in init.external_data}
            if entries.get("location") != EXTERNAL_DATA_NAME:
                raise ValueError(f"{plain_path}: {init.name} is not in {EXTERNAL_DATA_NAME}")
            external[init.name] = list(init.external_data)
    if not external:
        raise ValueError(f"{plain_path} keeps its weights inline; save it with external data first")
    onnx.load_external_data_for_model(plain, unet_dir)
    by_content = {_digest(i): i.name for i in plain.graph.initializer if i.name in external}

    with tempfile.TemporaryDirectory(dir=unet_dir) as tmp:
        variant = _trace(
            UNetResidualExport(unet, len(down_shapes)),
            args,
            os.path.join(tmp, "model.onnx"),
            names,
            ["out_sample"],
            dynamic,
            opset,
        )
    if compact:
        compact_names(variant)
    inline = 0
    for init in variant.graph.initializer:
        source = by_content.get(_digest(init))
        if source is None:
            inline += len(init.raw_data)
            continue
        init.ClearField("raw_data")
        del init.external_data[:]
        init.external_data.extend(external[source])
        init.data_location = onnx.TensorProto.EXTERNAL
    if inline > (1 << 20):
        raise ValueError(f"{inline} bytes of the variant's weights match nothing in the plain UNet")
    path = os.path.join(unet_dir, UNET_VARIANT)
    if os.path.exists(path):
        os.remove(path)
    with open(path, "wb") as f:
        f.write(variant.SerializeToString())
    return inline


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="diffusers ControlNetModel: hub id or local directory")
    source.add_argument("--unet-of", help="diffusers SDXL pipeline whose export in --output gets the UNet variant")
    p.add_argument("--output", required=True, help="ControlNet: directory (replaced); UNet variant: the SDXL export")
    p.add_argument("--text-embeds-dim", type=int, default=1280, help="pooled text embedding width (1280 for SDXL)")
    p.add_argument("--vae-scale-factor", type=int, default=8)
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    p.add_argument(
        "--optimize",
        action="store_true",
        help="with --model: fuse with onnxruntime.transformers and convert to float16 (CUDA only)",
    )
    args = p.parse_args(argv)
    if args.optimize and not args.model:
        p.error("--optimize applies to --model (a fused UNet variant comes from export_sdxl.py --optimize --controlnet-unet)")
    return args


def main(argv=None):
    args = parse_args(argv)
    out = os.path.abspath(args.output)
    if args.model:
        from diffusers import ControlNetModel

        controlnet = ControlNetModel.from_pretrained(args.model, torch_dtype=torch.float32)
        if os.path.exists(out):
            shutil.rmtree(out)
        if not args.optimize:
            export_controlnet(controlnet, out, args.text_embeds_dim, args.vae_scale_factor, args.opset)
            return 0
        from optimize_sdxl import optimize_controlnet

        staging = tempfile.mkdtemp(prefix="controlnet-fp32-", dir=os.path.dirname(out))
        try:
            export_controlnet(controlnet, staging, args.text_embeds_dim, args.vae_scale_factor, args.opset)
            del controlnet
            report = optimize_controlnet(staging, out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        print(json.dumps(report, indent=2, sort_keys=True))
        return 0
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(args.unet_of, subfolder="unet", torch_dtype=torch.float32)
    unet_dir = os.path.join(out, "unet")
    if not os.path.exists(os.path.join(unet_dir, EXTERNAL_DATA_NAME)):
        # Move inline weights out so that both graphs can share them.
        model = onnx.load(os.path.join(unet_dir, "model.onnx"))
        save_model(model, os.path.join(unet_dir, "model.onnx"), external=True)
    export_unet_variant(unet, unet_dir, args.text_embeds_dim, args.opset)
    return 0


if __name__ == "__main__":
    sys.exit(main())

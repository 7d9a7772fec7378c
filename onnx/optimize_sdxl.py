"""Fused float16 SDXL export for ONNX Runtime's CUDA execution provider.

Takes an fp32 export in the Optimum layout (as `export_sdxl.py` writes it) and writes the same
layout with every graph fused by `onnxruntime.transformers.optimizer` and converted to float16:

- `unet` (model type "unet"): MultiHeadAttention with packed QKV / KV, GroupNorm,
  SkipGroupNorm, BiasSplitGelu, NhwcConv, BiasAdd, LayerNormalization fusions.
- `text_encoder`, `text_encoder_2` (model type "clip"): layer-norm and GELU fusions (ONNX Runtime's
  CLIP attention pattern does not match the attention graph transformers 5 exports).
- `vae_decoder`, `vae_encoder` (model type "vae"): fused but kept float32 unless asked
  otherwise, because the stock SDXL VAE overflows float16 (NaN, black images).
- `unet/model_controlnet.onnx`, the UNet taking ControlNet residuals, when the export has it:
  fused like the UNet, its weights in `unet/model_controlnet.onnx_data` (fusion rewrites the
  weights, so the two graphs no longer share one file).

`optimize_controlnet` does the same to a ControlNet export (`export_controlnet.py`): the
ControlNet's down and mid blocks are the UNet's, so it takes the UNet fusions and float16.

Two known traps are handled here. The float16 conversion must leave the `scales` input of every
Resize node float32 (ONNX Runtime rejects a float16 one): this is checked, and repaired when a
converter version gets it wrong. And fused operators are not excluded from the conversion, or
their float32 islands would cost a Cast pair per node. The UNet attention fusion reads head
counts with `int()` on one-element arrays, which numpy 2.4 rejects: numpy is pinned below 2.4.

The fused operators (NhwcConv, GroupNorm, ...) have no CPU kernels: the result runs on CUDA only.
"""

import os
import shutil

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import load_external_data_for_model

from export_sdxl import save_model
from fusion_prepass import simplify_for_fusion

UNET_VARIANT = "model_controlnet.onnx"
UNET_VARIANT_DATA = "model_controlnet.onnx_data"

COMPONENTS = {
    "text_encoder": "clip",
    "text_encoder_2": "clip",
    "unet": "unet",
    "vae_decoder": "vae",
    "vae_encoder": "vae",
}
VAE_COMPONENTS = ("vae_decoder", "vae_encoder")


def _check_numpy():
    major, minor = (int(x) for x in np.__version__.split(".")[:2])
    if (major, minor) >= (2, 4):
        raise RuntimeError(
            f"numpy {np.__version__} breaks the UNet attention fusion (head count detection); "
            "install numpy<2.4 (see onnx/requirements.txt)"
        )


def _producers(graph):
    return {out: node for node in graph.node for out in node.output}


def _float_constant(graph, name):
    """The initializer or Constant-node tensor called `name`, or None."""
    for init in graph.initializer:
        if init.name == name:
            return init
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            for attr in node.attribute:
                if attr.name == "value":
                    return attr.t
    return None


def _value_type(graph, name):
    for vi in list(graph.value_info) + list(graph.input) + list(graph.output):
        if vi.name == name:
            return vi.type.tensor_type.elem_type
    return None


def resize_scale_types(model):
    """Element type of the `scales` input of every Resize node (None when not determinable)."""
    graph = model.graph
    producers = _producers(graph)
    types = {}
    for node in graph.node:
        if node.op_type != "Resize" or len(node.input) < 3 or not node.input[2]:
            continue
        name = node.input[2]
        const = _float_constant(graph, name)
        if const is not None:
            types[node.name] = const.data_type
            continue
        producer = producers.get(name)
        if producer is not None and producer.op_type == "Cast":
            types[node.name] = next(a.i for a in producer.attribute if a.name == "to")
        else:
            types[node.name] = _value_type(graph, name)
    return types


def keep_resize_scales_float32(model):
    """Give every Resize a float32 `scales` input; returns how many were repaired."""
    graph = model.graph
    producers = _producers(graph)
    fixed = 0
    for node in list(graph.node):
        if node.op_type != "Resize" or len(node.input) < 3 or not node.input[2]:
            continue
        name = node.input[2]
        const = _float_constant(graph, name)
        if const is not None:
            if const.data_type == TensorProto.FLOAT:
                continue
            value = numpy_helper.to_array(const).astype(np.float32)
            new_name = f"{name}_float32"
            if _float_constant(graph, new_name) is None:
                graph.initializer.append(numpy_helper.from_array(value, new_name))
            node.input[2] = new_name
            fixed += 1
            continue
        producer = producers.get(name)
        to = None
        if producer is not None and producer.op_type == "Cast":
            to = next(a.i for a in producer.attribute if a.name == "to")
        if to == TensorProto.FLOAT or (to is None and _value_type(graph, name) == TensorProto.FLOAT):
            continue
        cast_out = f"{name}_float32"
        graph.node.append(
            helper.make_node("Cast", [name], [cast_out], name=f"{node.name}_scales_to_float32", to=TensorProto.FLOAT)
        )
        node.input[2] = cast_out
        fixed += 1
    return fixed


# The CUDA kernel of BiasSplitGelu only handles these widths (the GEGLU projections of SD and
# SDXL); any other width fails at run time, so the fusion is skipped for such models.
BIAS_SPLIT_GELU_WIDTHS = (2560, 5120, 6144, 10240, 12288)


def _bias_split_gelu_widths(model):
    widths = set()
    for node in model.model.graph.node:
        if node.op_type == "BiasSplitGelu":
            bias = model.get_initializer(node.input[1])
            widths.add(int(np.prod(bias.dims)) if bias is not None else -1)
    return widths


def _fuse(src_path, model_type, float16, bias_split_gelu=True):
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions(model_type)
    if model_type == "unet":
        # Packed QKV/KV only pay off (and are only supported) with float16 on CUDA.
        options.enable_packed_qkv = float16
        options.enable_packed_kv = float16
    options.enable_bias_splitgelu = bias_split_gelu
    # The optimizer's shape inference copies the whole model, weights included, several times.
    # So the graph is fused with the weights of an external data file left on disk: a fusion
    # that reads a weight loads it on demand (onnx resolves the file against the working
    # directory, hence the chdir), and the rest is loaded afterwards, before anything converts
    # or saves the weights. Same graph and weights as loading everything first; on a 1.4 GB
    # float32 UNet (SDXL's layout at half width) fusion took 74 s instead of 92 s.
    model = onnx.load(src_path, load_external_data=False)
    # Fewer nodes for the optimizer's whole-graph walks; the same fused result (fusion_prepass.py).
    simplify_for_fusion(model)
    here = os.getcwd()
    os.chdir(os.path.dirname(os.path.abspath(src_path)))
    try:
        fused = optimize_model(
            model,
            model_type=model_type,
            num_heads=0,
            hidden_size=0,
            opt_level=0,
            optimization_options=options,
            use_gpu=True,
        )
        load_external_data_for_model(fused.model, ".")
    finally:
        os.chdir(here)
    return fused


def optimize_component(src_path, model_type, float16, log=print):
    """Fuse one graph (and convert it to float16); returns the ONNX Runtime OnnxModel."""
    model = _fuse(src_path, model_type, float16)
    unsupported = _bias_split_gelu_widths(model) - set(BIAS_SPLIT_GELU_WIDTHS)
    if unsupported:
        log(f"BiasSplitGelu widths {sorted(unsupported)} have no CUDA kernel: fusing without it")
        model = _fuse(src_path, model_type, float16, bias_split_gelu=False)
    if float16:
        # No op block list: keeping fused operators in float32 would surround each with Casts.
        model.convert_float_to_float16(keep_io_types=False, op_block_list=[])
    keep_resize_scales_float32(model.model)
    model.topological_sort()
    domains = {node.domain for node in model.model.graph.node}
    imported = {opset.domain for opset in model.model.opset_import}
    if "com.microsoft" in domains and "com.microsoft" not in imported:
        model.model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return model


def optimize_export(src_dir, out_dir, fp16_vae=False, log=print):
    """Write the fused export of `src_dir` to `out_dir`; returns fused operator counts."""
    _check_numpy()
    report = {}
    for entry in sorted(os.listdir(src_dir)):
        src = os.path.join(src_dir, entry)
        if entry in COMPONENTS:
            continue
        dst = os.path.join(out_dir, entry)
        if os.path.isdir(src):
            shutil.copytree(src, dst)
        else:
            os.makedirs(out_dir, exist_ok=True)
            shutil.copy2(src, dst)
    for name, model_type in COMPONENTS.items():
        src = os.path.join(src_dir, name, "model.onnx")
        float16 = fp16_vae or name not in VAE_COMPONENTS
        log(f"optimizing {name} ({model_type}, {'float16' if float16 else 'float32'})")
        model = optimize_component(src, model_type, float16, log=log)
        bad = {n: t for n, t in resize_scale_types(model.model).items() if t != TensorProto.FLOAT}
        if bad:
            raise RuntimeError(f"{name}: Resize scales not float32: {bad}")
        dst_dir = os.path.join(out_dir, name)
        os.makedirs(dst_dir, exist_ok=True)
        shutil.copy2(os.path.join(src_dir, name, "config.json"), os.path.join(dst_dir, "config.json"))
        save_model(model.model, os.path.join(dst_dir, "model.onnx"))
        counts = {op: n for op, n in model.get_fused_operator_statistics().items() if n}
        report[name] = {
            "float16": float16,
            "fused_operators": counts,
            "resize_nodes": len(resize_scale_types(model.model)),
        }
    variant = os.path.join(src_dir, "unet", UNET_VARIANT)
    if os.path.exists(variant):
        log("optimizing unet/model_controlnet.onnx (unet, float16)")
        report["unet_controlnet"] = optimize_unet_variant(variant, os.path.join(out_dir, "unet"), log)
    return report


def _fused_report(model):
    return {op: n for op, n in model.get_fused_operator_statistics().items() if n}


def optimize_unet_variant(src_path, dst_unet_dir, log=print):
    """Fuse the residual UNet at `src_path` into `dst_unet_dir/model_controlnet.onnx` (float16,
    weights in `model_controlnet.onnx_data`); returns fused operator counts."""
    _check_numpy()
    model = optimize_component(src_path, "unet", True, log=log)
    os.makedirs(dst_unet_dir, exist_ok=True)
    save_model(model.model, os.path.join(dst_unet_dir, UNET_VARIANT), external=True, data_name=UNET_VARIANT_DATA)
    return {"float16": True, "fused_operators": _fused_report(model)}


def optimize_controlnet(src_dir, dst_dir, log=print):
    """Write the fused float16 export of the ControlNet export `src_dir` to `dst_dir` (replaced);
    returns fused operator counts."""
    _check_numpy()
    model = optimize_component(os.path.join(src_dir, "model.onnx"), "unet", True, log=log)
    if os.path.exists(dst_dir):
        shutil.rmtree(dst_dir)
    os.makedirs(dst_dir)
    for entry in os.listdir(src_dir):
        if entry.endswith(".json"):
            shutil.copy2(os.path.join(src_dir, entry), os.path.join(dst_dir, entry))
    save_model(model.model, os.path.join(dst_dir, "model.onnx"))
    return {"float16": True, "fused_operators": _fused_report(model)}

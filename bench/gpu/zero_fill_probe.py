"""Two ways to zero the ControlNet residual inputs of SDXL's residual UNet for one 1024x1024 run
with guidance (ten float16 tensors, 53.7 million values), timed side by side with ONNX Runtime's
Python API:

- host: float32 zeros made on the host, converted to float16 there and copied into the device
  buffers (what the engine did at the start of every run before src/engine/zero_fill.rs);
- device: one run of a graph that expands a one-element zero to each buffer's shape, its
  outputs bound to the device buffers (what src/engine/zero_fill.rs does).

    python3 bench/gpu/zero_fill_probe.py [--device cuda|cpu] [--runs N]

Prints one JSON line: the median and minimum of each, in milliseconds.
"""

import argparse
import json
import statistics
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

# (channels, latent side) of the nine down residuals and the mid residual at 1024x1024.
SLOTS = [(320, 128)] * 3 + [(320, 64), (640, 64), (640, 64), (640, 32)] + [(1280, 32)] * 3
ROWS = 2  # negative and positive rows of one image under guidance


def zero_graph(count):
    inputs = [helper.make_tensor_value_info(f"shape{k}", TensorProto.INT64, [4]) for k in range(count)]
    outputs = [
        helper.make_tensor_value_info(f"zeros{k}", TensorProto.FLOAT16, [None] * 4) for k in range(count)
    ]
    zero = helper.make_tensor("zero", TensorProto.FLOAT16, [1], np.zeros(1, np.float16).tobytes(), raw=True)
    nodes = [helper.make_node("Expand", ["zero", f"shape{k}"], [f"zeros{k}"]) for k in range(count)]
    graph = helper.make_graph(nodes, "zero_fill", inputs, outputs, initializer=[zero])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what ONNX Runtime 1.16 and later read
    return model.SerializeToString()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda")
    p.add_argument("--runs", type=int, default=10)
    args = p.parse_args()
    provider = "CUDAExecutionProvider" if args.device == "cuda" else "CPUExecutionProvider"
    shapes = [[ROWS, c, s, s] for c, s in SLOTS]
    buffers = [ort.OrtValue.ortvalue_from_shape_and_type(s, np.float16, args.device, 0) for s in shapes]
    ones = [np.ones(s, np.float16) for s in shapes]

    def dirty():
        for buf, one in zip(buffers, ones):
            buf.update_inplace(one)

    def all_zero():
        return all(not buf.numpy().any() for buf in buffers)

    def host():
        for buf, s in zip(buffers, shapes):
            zeros = np.zeros(int(np.prod(s)), np.float32).astype(np.float16).reshape(s)
            buf.update_inplace(zeros)

    session = ort.InferenceSession(zero_graph(len(shapes)), providers=[provider])
    binding = session.io_binding()
    for k, (buf, s) in enumerate(zip(buffers, shapes)):
        binding.bind_cpu_input(f"shape{k}", np.array(s, np.int64))
        binding.bind_ortvalue_output(f"zeros{k}", buf)

    def device():
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()

    report = {
        "what": "zeroing the residual inputs of one 1024x1024 SDXL run with guidance "
        "(bench/gpu/zero_fill_probe.py)",
        "device": args.device,
        "onnxruntime": ort.__version__,
        "values": int(sum(np.prod(s) for s in shapes)),
    }
    for name, fill in [("host", host), ("device", device)]:
        times = []
        for _ in range(args.runs + 1):
            dirty()
            started = time.perf_counter()
            fill()
            times.append((time.perf_counter() - started) * 1000)
            if not all_zero():
                raise SystemExit(f"{name}: the buffers are not all zero")
        times = times[1:]  # the first run warms up
        report[f"{name}_median_ms"] = statistics.median(times)
        report[f"{name}_min_ms"] = min(times)
    print(json.dumps(report))


if __name__ == "__main__":
    onnx.checker.check_model(onnx.load_from_string(zero_graph(len(SLOTS))))
    main()

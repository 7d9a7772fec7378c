"""Time the fused UNet (the plain one, or the residual UNet with zero ControlNet residuals) in
ONNX Runtime's Python API (IoBinding, batch 2, 1024²) and list the
CUDA libraries the process loaded. `--torch-first` imports PyTorch before ONNX Runtime, so that
its bundled cuDNN and cuBLAS are the ones loaded.

Then, for about three seconds, the UNet runs back to back (each run waited for, as a denoising
loop does) while NVML's utilization counter is read every 20 ms: `busy_percent` is what that
counter, the one behind nvidia-smi's GPU busy figure, reports for a GPU that does nothing but
this UNet. The counter misses the microsecond gaps between kernels and moves by a few points
from one reading to the next; bench/gpu/kernel_trace.py reads the GPU's own kernel timeline.

The functions here also set up and time the sessions kernel_trace.py traces."""
import json
import sys
import threading
import time

import numpy as np

if "--torch-first" in sys.argv:
    import torch  # noqa: F401
import onnxruntime as ort

TYPES = {"tensor(float16)": np.float16, "tensor(float)": np.float32, "tensor(int64)": np.int64}
DIMS = {"batch_size": 2, "height": 128, "width": 128, "sequence_length": 77}


def residual_size(name):
    """Latent-size divisor of a ControlNet residual input of the SDXL UNet (unet/model_controlnet.onnx):
    down residuals 0-2 at full latent size, 3-5 at half, 6-8 at a quarter; the mid one at a quarter."""
    if name.startswith("mid_block_additional_residual"):
        return 4
    return 2 ** min(int(name.rsplit("_", 1)[1]) // 3, 2)


def bound_session(path, options):
    """The model at `path` (the UNet, or a text encoder) on the CUDA execution provider with
    `options`, and an IoBinding whose inputs (random, at batch 2, 128x128 latents, 77 tokens)
    and outputs live on the GPU."""
    sess = ort.InferenceSession(path, providers=[("CUDAExecutionProvider", options)])
    io = sess.io_binding()
    for i in sess.get_inputs():
        if "additional_residual" in i.name:
            # A residual UNet without ControlNets reads zeros there, as the engine feeds it.
            size = 128 // residual_size(i.name)
            shape = [2, i.shape[1], size, size]
            arr = np.zeros(shape, dtype=TYPES[i.type])
            io.bind_ortvalue_input(i.name, ort.OrtValue.ortvalue_from_numpy(arr, "cuda", 0))
            continue
        shape = [d if isinstance(d, int) else DIMS.get(d, 1) for d in i.shape]
        if TYPES[i.type] == np.int64:
            # Token ids (a text encoder's input_ids): within CLIP's vocabulary.
            arr = np.random.randint(0, 49408, size=shape).astype(np.int64)
        else:
            arr = np.random.randn(*shape) * (999 if i.name == "timestep" else 1)
            arr = np.asarray(arr).astype(TYPES[i.type])
        io.bind_ortvalue_input(i.name, ort.OrtValue.ortvalue_from_numpy(arr, "cuda", 0))
    for o in sess.get_outputs():
        io.bind_output(o.name, "cuda")
    return sess, io


def options_from(args):
    """Device 0 and the CUDA provider options given as JSON objects among `args`."""
    options = {"device_id": 0}
    for arg in args:
        if arg.startswith("{"):
            options.update(json.loads(arg))
    return options


def busy_while(work):
    """NVML's mean utilization (percent) of GPU 0 while `work` runs; None without NVML."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    except Exception:  # no NVML bindings or no driver: report no figure
        work()
        return None
    samples, done = [], threading.Event()

    def sample():
        while not done.is_set():
            samples.append(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
            time.sleep(0.02)

    thread = threading.Thread(target=sample)
    thread.start()
    try:
        work()
    finally:
        done.set()
        thread.join()
    return sum(samples) / len(samples) if samples else None


def run_once(sess, io):
    """One run, waited for as a denoising loop waits for it."""
    sess.run_with_iobinding(io)
    io.synchronize_outputs()


def run_times(sess, io, warm_up, runs):
    """Milliseconds of each of `runs` runs, after `warm_up` untimed ones."""
    for _ in range(warm_up):
        run_once(sess, io)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        run_once(sess, io)
        times.append((time.perf_counter() - t) * 1000)
    return times


def busy_back_to_back(sess, io, seconds=3.0):
    """NVML's busy reading while the session runs back to back for `seconds`."""

    def loop():
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            run_once(sess, io)

    return busy_while(loop)


def main():
    options = options_from(sys.argv[2:])
    sess, io = bound_session(sys.argv[1], options)
    times = run_times(sess, io, 3, 10)
    busy = busy_back_to_back(sess, io)
    maps = open("/proc/self/maps")
    libs = sorted({l.split()[-1] for l in maps if "cudnn" in l or "cublas" in l})
    print(json.dumps({
        "options": options,
        "torch_first": "--torch-first" in sys.argv,
        "median_ms": sorted(times)[5],
        "busy_percent": busy,
        "libs": len(libs),
    }))


if __name__ == "__main__":
    main()

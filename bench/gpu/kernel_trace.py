"""Where the GPU's time goes while ONNX Runtime runs the fused UNet (or a text encoder) back to
back, from a trace of every CUDA kernel, copy and memset the process runs.

PyTorch's profiler records through CUPTI, which sees the kernels of every library in the
process, ONNX Runtime's included. The UNet (batch 2, 128x128 latents, inputs and output bound
on the GPU as bench/gpu/ort_probe.py binds them) runs RUNS times back to back, each run waited
for as a denoising loop waits for it, once with ONNX Runtime's default CUDA options and once
with its CUDA graphs; a text encoder (batch 2, 77 tokens, every output bound on the GPU) runs
with the default options. For each setting the result holds:

- `busy_percent`: the share of the traced span (first kernel's start to last one's end) in which
  at least one kernel, copy or memset ran: the GPU's busy ratio from its own timeline;
- per run (medians): kernels, the run's GPU span, its busy time, the idle time between its
  kernels (in all, the largest gap, and how much of it lies in gaps longer than 10 us);
- between runs: the idle gap from one run's last kernel to the next run's first (the host's
  share: ONNX Runtime's Run call, the wait, Python);
- `nvml_busy_percent`: NVML's utilization counter (the figure nvidia-smi shows) read every
  20 ms over about three seconds of the same runs without the profiler.

CUPTI adds a little time per kernel, so the traced runs are somewhat slower than untraced ones;
`run_ms` gives both.

    python3 bench/gpu/kernel_trace.py OUT.json RUNS MODEL.onnx...
"""
import json
import os
import statistics
import sys
import tempfile
import time

import torch  # first: its CUPTI and profiler
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ort_probe  # noqa: E402  (after torch, so that PyTorch's CUDA libraries load first)

GPU_KINDS = ("kernel", "gpu_memcpy", "gpu_memset")
LONG_GAP_US = 10.0


def union_us(intervals):
    """Total length of the union of (start, end) intervals, in their unit."""
    total, end = 0.0, None
    start = None
    for s, e in sorted(intervals):
        if end is None or s > end:
            if end is not None:
                total += end - start
            start, end = s, e
        else:
            end = max(end, e)
    if end is not None:
        total += end - start
    return total


def analyze(events):
    """Busy ratio and gaps from chrome-trace events: GPU activity (`cat` in GPU_KINDS, `ts`
    and `dur` in microseconds) and the `run<i>` user annotations that open each run."""
    gpu = sorted(
        (e["ts"], e["ts"] + e.get("dur", 0.0))
        for e in events
        if e.get("cat") in GPU_KINDS and "ts" in e
    )
    marks = sorted(
        e["ts"]
        for e in events
        if e.get("cat") == "user_annotation" and str(e.get("name", "")).startswith("run")
    )
    if not gpu:
        return {"kernels": 0, "note": "the trace holds no GPU activity"}
    span = gpu[-1][1] - gpu[0][0]
    runs = []
    bounds = marks + [float("inf")]
    for lo, hi in zip(bounds, bounds[1:]):
        mine = [iv for iv in gpu if lo <= iv[0] < hi]
        if not mine:
            continue
        run_span = max(e for _, e in mine) - mine[0][0]
        busy = union_us(mine)
        gaps, reach = [], mine[0][1]
        for s, e in mine[1:]:
            if s > reach:
                gaps.append(s - reach)
            reach = max(reach, e)
        runs.append({
            "first_us": mine[0][0],
            "last_us": reach,
            "kernels": len(mine),
            "span_ms": run_span / 1000,
            "busy_ms": busy / 1000,
            "idle_ms": sum(gaps) / 1000,
            "largest_gap_us": max(gaps, default=0.0),
            "idle_in_long_gaps_ms": sum(g for g in gaps if g > LONG_GAP_US) / 1000,
        })
    between = [b["first_us"] - a["last_us"] for a, b in zip(runs, runs[1:])]

    def median(key):
        return statistics.median(r[key] for r in runs) if runs else None

    return {
        "kernels": len(gpu),
        "runs": len(runs),
        "span_ms": span / 1000,
        "busy_percent": 100.0 * union_us(gpu) / span if span > 0 else None,
        "per_run": {
            "kernels": median("kernels"),
            "span_ms": median("span_ms"),
            "busy_ms": median("busy_ms"),
            "idle_between_kernels_ms": median("idle_ms"),
            "largest_gap_us": median("largest_gap_us"),
            "idle_in_gaps_over_10us_ms": median("idle_in_long_gaps_ms"),
        },
        "between_runs_ms": {
            "median": statistics.median(between) / 1000 if between else None,
            "max": max(between) / 1000 if between else None,
        },
    }


def trace(sess, io, runs):
    """Runs the bound session `runs` times under the profiler; the analysis and the traced
    runs' median wall time."""
    walls = []
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(runs):
            t = time.perf_counter()
            with record_function(f"run{i}"):
                ort_probe.run_once(sess, io)
            walls.append((time.perf_counter() - t) * 1000)
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.load(open(f.name)).get("traceEvents", [])
    result = analyze(events)
    result["traced_run_ms"] = statistics.median(walls)
    return result


def setting(path, options, runs):
    sess, io = ort_probe.bound_session(path, options)
    walls = ort_probe.run_times(sess, io, 5, 10)
    nvml = ort_probe.busy_back_to_back(sess, io)
    result = trace(sess, io, runs)
    result["untraced_run_ms"] = statistics.median(walls)
    result["nvml_busy_percent"] = nvml
    result["options"] = options
    del sess, io
    return result


def main():
    out, runs, paths = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    results = []
    for path in paths:
        settings = [{"device_id": 0}]
        if "unet" in path:
            settings.append({"device_id": 0, "enable_cuda_graph": "1"})
        for options in settings:
            result = {"model": path, **setting(path, options, runs)}
            print(json.dumps(result), flush=True)
            results.append(result)
    json.dump({
        "what": "each model in ONNX Runtime's Python API (the UNet at batch 2 and 128x128 "
                "latents, with and without CUDA graphs; text encoders at batch 2 and 77 tokens), "
                f"run {runs} times back to back under PyTorch's profiler (CUPTI; "
                "bench/gpu/kernel_trace.py): the GPU's own timeline of kernels, copies and "
                "memsets, with NVML's counter over the same runs untraced",
        "torch": torch.__version__,
        "onnxruntime": ort_probe.ort.__version__,
        "results": results,
    }, open(out, "w"), indent=1)


if __name__ == "__main__":
    main()

"""The worker end to end on a GPU host: message in -> PNG in storage -> row succeeded.

Needs Postgres and RabbitMQ running on their usual local ports (bench/gpu/services.sh starts
carried copies), the `sdxl-worker` binary and a full-size model directory. Python's standard
library only (the GPU host has no AMQP or Postgres client for Python): jobs are published with
`sdxl-worker submit` and rows read with `sdxl-worker status`, as an operator would.

For each scenario (a `worker.max_batch`, a `worker.prefetch` and the devices, one GPU consumer
each), it starts one worker process, runs warm-up jobs until every consumer has finished one
(model load, cuDNN's algorithm search, CUDA graph capture), then publishes JOBS jobs per device
at once (a saturated queue: 30 Euler steps at 1024x1024, one image each, distinct prompts and
seeds) and waits for every row to succeed. It reports images per second over the window from
the first publish to the last finished row, the median job time and metrics from the rows
(queue wait, denoising, VAE, PNG, upload, batch size), per device the jobs it ran and its GPU
busy ratio over that window (nvidia-smi utilization sampled every 100 ms), and the peak GPU
memory.

    python3 bench/gpu/worker_e2e.py --bin BIN --model DIR --out OUT/worker-e2e.json \
        --scenarios 1:2,4:8,1:2@cuda:0+cuda:1

A scenario is `MAX_BATCH:PREFETCH`, optionally `@DEVICES` (`+`-separated; `--device` otherwise).

With `--controlnet DIR` (a ControlNet export, configured as the canny one; the model needs
`unet/model_controlnet.onnx`) every job also carries that ControlNet with an inline control image:
the synthetic edge image benches/gpu_engine.rs draws, at the job's size, conditioning scale 1.
"""

import argparse
import base64
import json
import math
import os
import re
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zlib
from datetime import datetime

PROMPTS = [
    "a photograph of an astronaut riding a horse on the moon, detailed, sharp focus",
    "a lighthouse on a cliff above a stormy sea at dusk, oil painting",
    "a bowl of ramen with a soft egg, studio lighting, food photography",
    "an isometric drawing of a small wooden cabin in a pine forest",
]


def start_intervals(rows):
    """Per device, the gaps between consecutive distinct start times of its jobs' rows."""
    starts = {}
    for r in rows.values():
        if r.get("started_at"):
            starts.setdefault(r.get("device"), set()).add(round(ts(r["started_at"]), 3))
    out = {}
    for device, values in starts.items():
        ordered = sorted(values)
        # Jobs of one batch start within a few milliseconds of each other.
        runs = [t for i, t in enumerate(ordered) if i == 0 or t - ordered[i - 1] > 0.05]
        out[str(device)] = [round(b - a, 3) for a, b in zip(runs, runs[1:])]
    return out


ANSI = re.compile(r"\x1b\[[0-9;]*m")
FIELD = re.compile(r"(\w+)=(\S+)")


def engine_runs(log_path, t0, t1):
    """The worker's `engine run` debug lines between t0 and t1 (epoch seconds): per engine
    run, when it ended (seconds after t0), its device and jobs, how long the engine thread sat
    idle before it (from the previous run's end to this run's first job reaching the thread),
    how long it gathered its batch, and how long the run took (model check, prompts, denoising,
    decoding)."""
    runs = []
    with open(log_path, errors="replace") as f:
        for line in f:
            line = ANSI.sub("", line)
            if "engine run" not in line:
                continue
            try:
                at = ts(line.split(None, 1)[0])
            except ValueError:
                continue
            if not t0 <= at <= t1:
                continue
            fields = dict(FIELD.findall(line))

            def number(key):
                return float(fields[key]) if key in fields else None

            runs.append({
                "end_s": round(at - t0, 3),
                "device": fields.get("device"),
                "jobs": int(fields.get("jobs", "0")),
                "idle_ms": number("idle_ms"),
                "gather_ms": number("gather_ms"),
                "run_ms": number("run_ms"),
            })

    def median(key):
        values = [r[key] for r in runs if r[key] is not None]
        return round(statistics.median(values), 3) if values else None

    return {
        "count": len(runs),
        "median_idle_ms": median("idle_ms"),
        "median_gather_ms": median("gather_ms"),
        "median_run_ms": median("run_ms"),
        "runs": runs,
    }


def edge_png(size):
    """White rings and spokes on black (benches/gpu_engine.rs `edge_image`), as an RGB PNG, with
    the standard library only."""
    c = size / 2.0
    rows = []
    for y in range(size):
        line = bytearray(b"\x00")  # filter type: none
        for x in range(size):
            dx, dy = x - c, y - c
            ring = math.modf(math.hypot(dx, dy) / (c / 6.0))[0] < 0.04
            spoke = abs(math.modf(math.degrees(math.atan2(dy, dx)) / 30.0)[0]) < 0.02
            line += b"\xff\xff\xff" if ring or spoke else b"\x00\x00\x00"
        rows.append(bytes(line))

    def chunk(kind, data):
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"".join(rows), 9))
        + chunk(b"IEND", b"")
    )


def config_text(args, scenario, prefix, images_dir):
    controlnet = f'[controlnet]\ncanny = "{args.controlnet}"\n' if args.controlnet else ""
    return controlnet + f"""
[broker]
url = "amqp://guest:guest@127.0.0.1:{args.amqp_port}/%2f"
prefix = "{prefix}"
[database]
url = "postgres://postgres@127.0.0.1:{args.pg_port}/sdxl"
[storage]
backend = "local"
path = "{images_dir}"
[worker]
id = "bench-{prefix}"
devices = [{", ".join(f'"{d}"' for d in scenario["devices"])}]
prefetch = {scenario['prefetch']}
max_batch = {scenario['max_batch']}
batch_window_ms = {scenario.get('window_ms', 50)}
progress_interval_ms = 500
poll_interval_ms = 20
[models]
default = "sdxl"
[models.available]
sdxl = {{ path = "{args.model}", default_width = 1024, default_height = 1024 }}
[cuda]
graph = {str(scenario.get('graph', False)).lower()}
"""


class Sampler:
    """nvidia-smi's GPU utilization and memory of the given GPUs, every 100 ms."""

    def __init__(self, indices):
        self.samples = []  # (time, GPU index, busy %, memory MiB)
        self.proc = None
        try:
            self.proc = subprocess.Popen(
                [
                    "nvidia-smi",
                    "--id=" + ",".join(str(i) for i in indices),
                    "--query-gpu=timestamp,index,utilization.gpu,memory.used",
                    "--format=csv,noheader,nounits",
                    "-lms",
                    "100",
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
        except FileNotFoundError:
            # No NVIDIA driver here (a CPU smoke run of this script): no samples.
            return
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            parts = [p.strip() for p in line.split(",")]
            if len(parts) == 4:
                try:
                    sample = (time.time(), int(parts[1]), float(parts[2]), float(parts[3]))
                except ValueError:
                    continue
                self.samples.append(sample)

    def stop(self):
        if self.proc:
            self.proc.terminate()
            self.proc.wait()

    def window(self, index, start, end):
        """Mean busy percent and peak memory of one GPU between two times."""
        inside = [s for s in self.samples if s[1] == index and start <= s[0] <= end]
        if not inside:
            return None, None
        return (
            sum(s[2] for s in inside) / len(inside),
            max(s[3] for s in inside),
        )


def gpu_index(device):
    return int(device.split(":")[1]) if ":" in device else 0


def cli(args, config, *rest, check=True):
    return subprocess.run(
        [args.bin, "--config", config, *rest],
        check=check,
        capture_output=True,
        text=True,
    )


def submit(args, config, n, seed):
    job_id = str(uuid.uuid4())
    if args.controlnet:
        message = {
            "version": 1,
            "id": job_id,
            "prompt": PROMPTS[n % len(PROMPTS)],
            "negative_prompt": "blurry, low quality",
            "steps": args.steps,
            "width": args.size,
            "height": args.size,
            "scheduler": "euler",
            "seed": seed,
            "controlnets": [
                {"type": "canny", "image_base64": args.control_image, "conditioning_scale": 1.0}
            ],
        }
        subprocess.run(
            [args.bin, "--config", config, "submit", "--json", "-"],
            input=json.dumps(message),
            check=True,
            capture_output=True,
            text=True,
        )
        return job_id
    cli(
        args,
        config,
        "submit",
        "--id",
        job_id,
        "--prompt",
        PROMPTS[n % len(PROMPTS)],
        "--negative-prompt",
        "blurry, low quality",
        "--steps",
        str(args.steps),
        "--width",
        str(args.size),
        "--height",
        str(args.size),
        "--scheduler",
        "euler",
        "--seed",
        str(seed),
    )
    return job_id


def submit_all(args, config, count, first_seed):
    """Publish `count` jobs at once (one thread each); returns their ids in order."""
    ids = [None] * count

    def publish(i):
        ids[i] = submit(args, config, i, first_seed + i)

    threads = [threading.Thread(target=publish, args=(i,)) for i in range(count)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return ids


def row(args, config, job_id):
    done = cli(args, config, "status", job_id, check=False)
    if done.returncode != 0:
        return None
    return json.loads(done.stdout)


def wait_all(args, config, ids, timeout):
    deadline = time.time() + timeout
    rows = {}
    while time.time() < deadline:
        for job_id in ids:
            if job_id in rows:
                continue
            r = row(args, config, job_id)
            if r and r.get("state") in ("succeeded", "failed", "cancelled"):
                rows[job_id] = r
        if len(rows) == len(ids):
            return rows
        time.sleep(0.2)
    raise SystemExit(f"only {len(rows)} of {len(ids)} jobs finished in {timeout} s")


def ts(text):
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def warm_up(args, config, scenario):
    """Publish warm-up jobs until every consumer has finished one. Each round holds as many
    jobs as all consumers together claim (`prefetch` each), at least one batch each, so that
    every consumer also pays its batched shapes' one-time costs before the measured window."""
    devices = scenario["devices"]
    per_round = max(scenario["max_batch"], scenario["prefetch"]) * len(devices)
    if len(devices) == 1:
        per_round = scenario["max_batch"]
    seen = set()
    attempts = []
    for attempt in range(3):
        ids = submit_all(args, config, per_round, 1000 + attempt * per_round)
        for warm_id, warm_row in wait_all(args, config, ids, 600).items():
            if warm_row["state"] != "succeeded":
                raise SystemExit(f"warm-up job {warm_id}: {json.dumps(warm_row)}")
            seen.add(warm_row.get("device"))
            attempts.append(warm_row.get("attempt", 1))
        if all(d in seen for d in devices):
            return attempts
    raise SystemExit(f"warm-up jobs ran on {sorted(map(str, seen))}, not on all of {devices}")


def scenario_run(args, scenario, sampler):
    prefix = f"e2e{scenario['max_batch']}x{len(scenario['devices'])}g{uuid.uuid4().hex[:6]}"
    work = tempfile.mkdtemp(prefix="e2e-", dir=args.work)
    images_dir = os.path.join(work, "images")
    config = os.path.join(work, "worker.toml")
    with open(config, "w") as f:
        f.write(config_text(args, scenario, prefix, images_dir))
    cli(args, config, "migrate")
    log = open(os.path.join(args.out_dir, f"worker-{prefix}.log"), "w")
    worker = subprocess.Popen(
        [args.bin, "--config", config, "worker"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "RUST_LOG": "info,sdxl_worker::worker::engine_thread=debug"},
    )
    try:
        started = time.time()
        # As many warm-up jobs as one batch holds, published together: the batched shapes
        # pay their one-time costs (cuDNN's algorithm search) before the measured window.
        warm_attempts = warm_up(args, config, scenario)
        warm_s = time.time() - started
        t0 = time.time()
        jobs = args.jobs * len(scenario["devices"])
        ids = submit_all(args, config, jobs, 1)
        rows = wait_all(args, config, ids, 900)
        states = [r["state"] for r in rows.values()]
        failed = [r for r in rows.values() if r["state"] != "succeeded"]
        if failed:
            raise SystemExit(f"jobs did not succeed: {json.dumps(failed[:2])}")
        finished = max(ts(r["finished_at"]) for r in rows.values())
        first_start = min(ts(r["started_at"]) for r in rows.values())
        per_device = {}
        for device in scenario["devices"]:
            mine = [r for r in rows.values() if r.get("device") == device]
            busy, peak = sampler.window(gpu_index(device), t0, finished)
            busy_running, _ = sampler.window(gpu_index(device), first_start, finished)
            per_device[device] = {
                "jobs": len(mine),
                "first_start_s": min((ts(r["started_at"]) - t0 for r in mine), default=None),
                "last_finish_s": max((ts(r["finished_at"]) - t0 for r in mine), default=None),
                "gpu_busy_percent": busy,
                "gpu_busy_percent_from_first_start": busy_running,
                "peak_gpu_memory_mib": peak,
            }

        def mean_of(key):
            values = [d[key] for d in per_device.values() if d[key] is not None]
            return sum(values) / len(values) if values else None

        busy = mean_of("gpu_busy_percent")
        busy_running = mean_of("gpu_busy_percent_from_first_start")
        peak = max((d["peak_gpu_memory_mib"] or 0 for d in per_device.values()), default=None)
        metrics = [r.get("metrics") or {} for r in rows.values()]

        def med(key):
            values = [m[key] for m in metrics if key in m and m[key] is not None]
            return statistics.median(values) if values else None

        pngs = sum(
            1
            for _, _, files in os.walk(images_dir)
            for f in files
            if f.endswith(".png")
        )
        return {
            "scenario": scenario,
            "jobs": jobs,
            "per_device": per_device,
            "states": {s: states.count(s) for s in set(states)},
            "pngs_in_storage": pngs,
            # A job whose first attempt failed (and a retry succeeded) counts here: with every
            # attempt fine, each is 1.
            "attempts": {
                "warm_up": warm_attempts,
                "max": max(r.get("attempt", 1) for r in rows.values()),
                "retried_jobs": sum(1 for r in rows.values() if r.get("attempt", 1) > 1),
            },
            "worker_start_and_warm_up_s": warm_s,
            "window_s": finished - t0,
            "images_per_s": jobs / (finished - t0),
            "images_per_s_from_first_start": jobs / (finished - first_start),
            "s_per_image": (finished - t0) / jobs,
            "gpu_busy_percent": busy,
            "gpu_busy_percent_from_first_start": busy_running,
            "peak_gpu_memory_mib": peak,
            "median_total_ms": med("total_ms"),
            "median_queue_wait_ms": med("queue_wait_ms"),
            "median_text_encoding_ms": med("text_encoding_ms"),
            "median_denoising_ms": med("denoising_ms"),
            "median_session_run_ms": med("session_run_ms"),
            "median_controlnet_ms": med("controlnet_ms"),
            "median_vae_ms": med("vae_ms"),
            "median_png_ms": med("png_ms"),
            "median_upload_ms": med("upload_ms"),
            "batch_sizes": sorted(m.get("batch_size", 1) for m in metrics),
            # Seconds between one run's start and the next on each device (a batch's jobs
            # start together): the worker's cycle, to set beside the engine's run time.
            "start_intervals_s": start_intervals(rows),
            # The engine threads' own account of the window (their `engine run` lines): the
            # idle gap between one run's end and the next run's first job, the batch gathering
            # and the run itself.
            "engine_runs": engine_runs(log.name, t0, finished),
            # Each job: started and finished (seconds after the first publish), batch size,
            # its first and median step and its device, to see where a run loses time.
            "timeline": sorted(
                [
                    round(ts(r["started_at"]) - t0, 3),
                    round(ts(r["finished_at"]) - t0, 3),
                    (r.get("metrics") or {}).get("batch_size", 1),
                    ((r.get("metrics") or {}).get("step_ms") or [None])[0],
                    statistics.median((r.get("metrics") or {}).get("step_ms") or [0]),
                    r.get("device"),
                ]
                for r in rows.values()
            ),
            "median_step_ms": statistics.median(
                s for m in metrics for s in (m.get("step_ms") or [])
            ),
        }
    finally:
        worker.terminate()
        try:
            worker.wait(60)
        except subprocess.TimeoutExpired:
            worker.kill()
        log.close()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--bin", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--jobs", type=int, default=12, help="jobs per device in each scenario")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--pg-port", type=int, default=5432)
    p.add_argument("--amqp-port", type=int, default=5672)
    p.add_argument("--work", default="/tmp")
    p.add_argument(
        "--scenarios",
        default="1:2,4:8",
        help="comma-separated max_batch:prefetch[@device+device...] scenarios",
    )
    p.add_argument("--controlnet", help="a ControlNet export every job applies (as canny)")
    args = p.parse_args()
    args.out_dir = os.path.dirname(os.path.abspath(args.out))
    if args.controlnet:
        args.control_image = base64.b64encode(edge_png(args.size)).decode()
    scenarios = []
    for spec in args.scenarios.split(","):
        sizes, _, devices = spec.partition("@")
        max_batch, prefetch = (int(x) for x in sizes.split(":"))
        devices = devices.split("+") if devices else [args.device]
        scenarios.append({"max_batch": max_batch, "prefetch": prefetch, "devices": devices})
    sampler = Sampler(sorted({gpu_index(d) for s in scenarios for d in s["devices"]}))
    results = []
    try:
        for scenario in scenarios:
            try:
                result = scenario_run(args, scenario, sampler)
            except (SystemExit, subprocess.CalledProcessError) as err:
                detail = getattr(err, "stderr", None) or str(err)
                result = {"scenario": scenario, "error": str(detail)[-2000:]}
            print(json.dumps(result), flush=True)
            results.append(result)
    finally:
        sampler.stop()
    env = {k: v for k, v in os.environ.items() if k.startswith("SDXL_")}
    report = {
        "model": args.model,
        "controlnet": args.controlnet,
        "steps": args.steps,
        "size": args.size,
        "env": env,
        "results": results,
    }
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())

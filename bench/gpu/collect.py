"""Merge the JSON files one GPU benchmark run wrote (bench/gpu/run.sh) into one result file, with
the issue's targets computed from the numbers of the same run.

    python3 bench/gpu/collect.py RUN_DIR bench/results/2026-11-28-h200.json
"""

import json
import os
import sys


def load(run_dir, name):
    path = os.path.join(run_dir, name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def main():
    run_dir, dst = sys.argv[1], sys.argv[2]
    eager = load(run_dir, "torch-eager.json")
    compiled = load(run_dir, "torch-compile.json")
    b1 = load(run_dir, "engine-b1.json")
    b1_vae16 = load(run_dir, "engine-b1-vae16.json")
    rest = load(run_dir, "optimize-rest.json")
    b4 = load(run_dir, "engine-b4.json")
    jobs4 = load(run_dir, "engine-jobs4.json")
    jobs4_vae16 = load(run_dir, "engine-jobs4-vae16.json")
    # The ControlNet sequence's residual UNet without a ControlNet, one job and four per run.
    cn_off_b1 = load(run_dir, "engine-controlnet-off.json")
    cn_off_jobs4 = load(run_dir, "engine-controlnet-off-jobs4.json")
    workers = {
        name[: -len(".json")]: load(run_dir, name)
        for name in sorted(os.listdir(run_dir))
        if name.startswith("worker-e2e") and name.endswith(".json")
    }
    rounds = {}
    for name in sorted(os.listdir(run_dir)):
        if name.startswith("engine-b1-r") and name.endswith(".json"):
            n = name[len("engine-b1-r") : -len(".json")]
            rounds[n] = {"b1": load(run_dir, name), "jobs4": load(run_dir, f"engine-jobs4-r{n}.json")}
    probe = load(run_dir, "ort-python-probe.json")
    tf32_off = load(run_dir, "engine-b1-tf32-off.json")
    optimize = load(run_dir, "optimize.json")
    gpu = open(os.path.join(run_dir, "gpu.csv")).read().strip().splitlines()[-1] if os.path.exists(os.path.join(run_dir, "gpu.csv")) else None

    def ok(results):
        return [r for r in (results or {}).get("results", []) if "error" not in r]

    engine = ok(b1)
    best = min(engine, key=lambda r: r["unet_step_session_run_ms"]) if engine else None
    default = next((r for r in engine if r["variant"] == "default"), None)
    host = next((r for r in engine if r["variant"] == "host_io"), None)
    plain_ort = None
    if probe:
        plain_ort = next(
            (
                r["median_ms"]
                for r in probe["results"]
                if not set(r["options"]) - {"device_id"} and not r.get("torch_first")
            ),
            None,
        )
    elif host:
        plain_ort = host["unet_step_session_run_ms"]
    targets = {}
    if best and compiled:
        # diffusers eager may be missing from a run (torch-eager not run): its comparisons then
        # read None.
        step_eager = eager["unet_step_b2"]["median_ms"] if eager else None
        step_compiled = compiled["unet_step_b2"]["median_ms"]
        ours = best["unet_step_session_run_ms"]
        targets["unet_step_b2"] = {
            "note": "UNet evaluation only, inputs already on the GPU, as the PyTorch numbers are "
            "timed; the engine's whole step (copies in and out, guidance, scheduler) is "
            "engine_step_wall_ms",
            "engine_ms": ours,
            "engine_variant": best["variant"],
            "engine_step_wall_ms": best["unet_step_ms"],
            "plain_onnxruntime_fused_ms": plain_ort,
            "diffusers_eager_ms": step_eager,
            "diffusers_reduce_overhead_ms": step_compiled,
            "beats_reduce_overhead": ours < step_compiled,
            "beats_plain_onnxruntime": plain_ort is not None and ours < plain_ort,
            "step_wall_beats_reduce_overhead": best["unet_step_ms"] < step_compiled,
            # Where a step's wall time goes besides the UNet (median per step).
            "engine_step_copy_ms": best.get("unet_step_copy_ms"),
            "engine_step_host_ms": best.get("unet_step_host_ms"),
        }
        targets["engine_vs_parts"] = {
            "run_s": best["run_s"],
            "bound_s": best["target_1_10_x_parts_ms"] / 1000,
            "met": best["within_1_10_x_parts"],
        }
        # End to end: the fastest whole run among the engine's variants.
        fastest = min(engine, key=lambda r: r["run_s"])
        e2e_eager = eager["pipeline_1"]["median_s"] if eager else None
        if e2e_eager:
            targets["engine_vs_diffusers_eager"] = {
                "engine_variant": fastest["variant"],
                "engine_s": fastest["run_s"],
                "diffusers_eager_s": e2e_eager,
                "speedup": e2e_eager / fastest["run_s"],
                "met": e2e_eager / fastest["run_s"] >= 2.3,
            }
        # With an fp16-safe VAE on both sides (the engine's float16 VAE decoder against
        # diffusers decoding in float16, force_upcast off).
        engine16 = ok(b1_vae16)
        if engine16 and eager and eager.get("pipeline_1_vae_fp16"):
            fastest16 = min(engine16, key=lambda r: r["run_s"])
            e2e16 = eager["pipeline_1_vae_fp16"]["median_s"]
            targets["engine_vs_diffusers_eager_vae_fp16"] = {
                "engine_variant": fastest16["variant"],
                "engine_s": fastest16["run_s"],
                "engine_vae_decode_ms": fastest16["vae_decode_ms"],
                "diffusers_eager_vae_fp16_s": e2e16,
                "speedup": e2e16 / fastest16["run_s"],
                "met": e2e16 / fastest16["run_s"] >= 2.3,
                "speedup_vs_diffusers_stock_vae": e2e_eager / fastest16["run_s"],
            }
        if compiled.get("pipeline_1"):
            targets["engine_vs_diffusers_compiled"] = {
                "engine_variant": fastest["variant"],
                "engine_s": fastest["run_s"],
                "diffusers_compiled_s": compiled["pipeline_1"]["median_s"],
                "speedup": compiled["pipeline_1"]["median_s"] / fastest["run_s"],
            }
    # The dynamic batch: four jobs through Engine::generate_batch (engine-jobs4.json), else
    # one request of four images (engine-b4.json), against one image per run; on the residual
    # UNet (the ControlNet sequence), four jobs without ControlNets against one.
    pairs = [
        ("plain", ok(jobs4) or ok(b4), engine),
        ("plain, float16 VAE", ok(jobs4_vae16), ok(b1_vae16)),
        ("residual", ok(cn_off_jobs4), ok(cn_off_b1)),
    ]
    # Repeated rounds on the same host (engine-b1-r2.json with engine-jobs4-r2.json, ...), each
    # round's single jobs and batches timed back to back.
    for n in sorted(rounds):
        pairs.append((f"plain, round {n}", ok(rounds[n]["jobs4"]), ok(rounds[n]["b1"])))
    for unet, batch, singles in pairs:
        if not (batch and singles):
            continue
        for r in batch:
            single = next((s for s in singles if s["variant"] == r["variant"]), None)
            if single is None:
                continue
            targets.setdefault("dynamic_batch_4", []).append(
                {
                    "unet": unet,
                    "variant": r["variant"],
                    "jobs": r.get("jobs", 1),
                    "images_per_s_b4": r["images_per_s"],
                    "images_per_s_b1": single["images_per_s"],
                    "ratio": r["images_per_s"] / single["images_per_s"],
                    "met": r["images_per_s"] >= 1.10 * single["images_per_s"],
                }
            )
    # The worker end to end against the engine alone with the same settings (CUDA graphs when
    # the run had SDXL_CUDA_GRAPH=true, TF32 with SDXL_CUDA_TF32=true).
    for name, run in workers.items():
        if (run or {}).get("controlnet"):
            continue  # compared with the engine's ControlNet runs below
        env = (run or {}).get("env", {})
        graph = env.get("SDXL_CUDA_GRAPH") == "true"
        tf32 = env.get("SDXL_CUDA_TF32") == "true"
        # Guidance and the Euler update run on the device unless the worker turned that off.
        host_step = env.get("SDXL_CUDA_DEVICE_STEP") == "false"
        variant = "+".join(
            [p for p, on in (("graph", graph), ("tf32", tf32), ("host_step", host_step)) if on]
        ) or "default"
        # A worker on the float16-VAE directory is compared with the engine on that directory,
        # one on the residual UNet (fused-cn) with the engine on that model.
        model = (run or {}).get("model", name)
        vae16 = "vae16" in model
        residual = "fused-cn" in model
        singles = ok(b1_vae16) if vae16 else ok(cn_off_b1) if residual else engine
        batched = ok(jobs4_vae16) if vae16 else ok(cn_off_jobs4) if residual else ok(jobs4)
        per_batch = {}
        for r in (run or {}).get("results", []):
            if "error" in r:
                continue
            max_batch = r["scenario"]["max_batch"]
            devices = r["scenario"].get("devices", ["cuda:0"])
            if len(devices) == 1:
                per_batch[max_batch] = r["images_per_s"]
            alone = None
            if len(devices) > 1:
                pass  # compared with the same worker on one GPU (gpus_scaling)
            elif max_batch == 1:
                alone = next((s for s in singles if s["variant"] == variant), None)
            elif max_batch == 4:
                alone = next((s for s in batched if s["variant"] == variant), None)
            entry = {
                "file": name,
                "residual_unet": residual,
                "cuda_graph": graph,
                "tf32": tf32,
                "vae_float16": vae16,
                "max_batch": max_batch,
                "prefetch": r["scenario"]["prefetch"],
                "devices": devices,
                "jobs": r["jobs"],
                "images_per_s": r["images_per_s"],
                "gpu_busy_percent": r["gpu_busy_percent"],
                "busy_met": (r["gpu_busy_percent"] or 0) >= 95,
            }
            if alone:
                entry["engine_alone_images_per_s"] = alone["images_per_s"]
                entry["ratio_to_engine"] = r["images_per_s"] / alone["images_per_s"]
                entry["within_5_percent_of_engine"] = entry["ratio_to_engine"] >= 0.95
            targets.setdefault("worker_saturated", []).append(entry)
        if 1 in per_batch and 4 in per_batch:
            targets.setdefault("worker_batch_4_vs_1", []).append(
                {
                    "file": name,
                    "variant": variant,
                    "ratio": per_batch[4] / per_batch[1],
                    "met": per_batch[4] >= 1.10 * per_batch[1],
                }
            )
    # What NVML reports for a GPU that only runs the UNet back to back (bench/gpu/ort_probe.py):
    # the most any runner of this UNet can show on the busy counter the worker target uses.
    probe_cn = load(run_dir, "ort-python-probe-cn.json")
    for key, found in (("gpu_busy_unet_alone", probe), ("gpu_busy_residual_unet_alone", probe_cn)):
        if found and any(r.get("busy_percent") is not None for r in found["results"]):
            targets[key] = {
                ("cuda_graph" if r["options"].get("enable_cuda_graph") == "1" else "default"): {
                    "busy_percent": r.get("busy_percent"),
                    "step_ms": r.get("median_ms"),
                }
                for r in found["results"]
                if not r.get("torch_first")
            }
    # ControlNet at full size: diffusers' ControlNet pipeline against the engine with the fused
    # float16 ControlNet and residual UNet (engine-controlnet.json), and each without ControlNet.
    cn_torch = load(run_dir, "torch-controlnet.json")
    cn_engine = ok(load(run_dir, "engine-controlnet.json"))
    cn_off = ok(cn_off_b1)
    if cn_torch and cn_engine:
        fastest = min(cn_engine, key=lambda r: r["run_s"])
        torch_cn = cn_torch["pipeline_1_controlnet"]["median_s"]
        torch_plain = cn_torch["pipeline_1"]["median_s"]
        entry = {
            "engine_variant": fastest["variant"],
            "engine_s": fastest["run_s"],
            "engine_step_ms": fastest["unet_step_ms"],
            "engine_controlnet_ms_per_run": fastest["controlnet_ms"],
            "diffusers_eager_s": torch_cn,
            "speedup": torch_cn / fastest["run_s"],
            "diffusers_eager_controlnet_and_unet_step_b2_ms": cn_torch["controlnet_step_b2"]["controlnet_and_unet"]["median_ms"],
            "diffusers_eager_without_controlnet_s": torch_plain,
            "diffusers_controlnet_cost": torch_cn / torch_plain,
            "by_variant_s": {r["variant"]: r["run_s"] for r in cn_engine},
        }
        if cn_off:
            off = min(cn_off, key=lambda r: r["run_s"])
            entry["engine_without_controlnet_s"] = off["run_s"]
            entry["engine_controlnet_cost"] = fastest["run_s"] / off["run_s"]
        targets["controlnet_engine_vs_diffusers_eager"] = entry
    # The worker with every job carrying the ControlNet, against the engine alone with the same
    # CUDA settings.
    for name, run in workers.items():
        if not (run or {}).get("controlnet"):
            continue
        env = run.get("env", {})
        on = [p for p, v in (("graph", "SDXL_CUDA_GRAPH"), ("tf32", "SDXL_CUDA_TF32")) if env.get(v) == "true"]
        variant = "+".join(on) or "default"
        alone = next((r for r in cn_engine if r["variant"] == variant), None)
        for r in run.get("results", []):
            if "error" in r:
                continue
            devices = r["scenario"].get("devices", ["cuda:0"])
            entry = {
                "file": name,
                "variant": variant,
                "devices": devices,
                "max_batch": r["scenario"]["max_batch"],
                "images_per_s": r["images_per_s"],
                "gpu_busy_percent": r["gpu_busy_percent"],
                "median_controlnet_ms": r.get("median_controlnet_ms"),
            }
            if alone and len(devices) == 1:
                entry["engine_alone_images_per_s"] = alone["images_per_s"]
                entry["ratio_to_engine"] = r["images_per_s"] / alone["images_per_s"]
            targets.setdefault("controlnet_worker_saturated", []).append(entry)
    # Several GPUs: one worker process with a consumer per GPU against the same worker on one
    # GPU, same file, same batch settings (target: 1.9x on two GPUs).
    for name, run in workers.items():
        results = [r for r in (run or {}).get("results", []) if "error" not in r]
        for r in results:
            devices = r["scenario"].get("devices", ["cuda:0"])
            if len(devices) < 2:
                continue
            one = next(
                (
                    o
                    for o in results
                    if len(o["scenario"].get("devices", ["cuda:0"])) == 1
                    and o["scenario"]["max_batch"] == r["scenario"]["max_batch"]
                    and o["scenario"]["prefetch"] == r["scenario"]["prefetch"]
                ),
                None,
            )
            if not one:
                continue
            ratio = r["images_per_s"] / one["images_per_s"]
            targets.setdefault("gpus_scaling", []).append(
                {
                    "file": name,
                    "controlnet": bool(run.get("controlnet")),
                    "max_batch": r["scenario"]["max_batch"],
                    "devices": devices,
                    "images_per_s": r["images_per_s"],
                    "one_gpu_images_per_s": one["images_per_s"],
                    "ratio": ratio,
                    "met": ratio >= 0.95 * len(devices),
                    "jobs_per_device": {d: v["jobs"] for d, v in r.get("per_device", {}).items()},
                    "gpu_busy_percent_per_device": {
                        d: v["gpu_busy_percent"] for d, v in r.get("per_device", {}).items()
                    },
                }
            )
    # What limits the targets this run missed, written after reading its numbers.
    notes = load(run_dir, "notes.json")
    report = {
        "gpu": gpu,
        "notes": notes,
        "torch_eager": eager,
        "torch_compile": compiled,
        "optimize": optimize,
        "engine_b1": b1,
        "engine_b1_vae16": b1_vae16,
        "optimize_rest": rest,
        "engine_b4": b4,
        "engine_jobs4": jobs4,
        "engine_jobs4_vae16": jobs4_vae16,
        "engine_rounds": rounds or None,
        "worker_e2e": workers,
        "engine_b1_tf32_off": tf32_off,
        "torch_controlnet": cn_torch,
        "optimize_controlnet": load(run_dir, "optimize-cn.json"),
        "engine_controlnet": load(run_dir, "engine-controlnet.json"),
        "engine_controlnet_off": cn_off_b1,
        "engine_controlnet_off_jobs4": cn_off_jobs4,
        "zero_fill_probe": load(run_dir, "zero-fill-probe.json"),
        "onnxruntime_python_probe": probe,
        "onnxruntime_python_probe_residual_unet": probe_cn,
        "kernel_trace": load(run_dir, "kernel-trace.json"),
        "targets": targets,
        "default_variant": default["variant"] if default else None,
    }
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    with open(dst, "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps(targets, indent=1))


if __name__ == "__main__":
    main()

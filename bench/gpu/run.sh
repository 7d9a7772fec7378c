#!/usr/bin/env bash
# The GPU benchmark: diffusers (eager and torch.compile) against the engine, full-size SDXL with
# random weights, on a GPU host that has CUDA 13, PyTorch and nothing else we need (no network).
# Everything it needs travels from a build machine in parts of at most 40 MB; see bench/README.md.
#
# On the build machine (repository root):
#   bench/gpu/run.sh stage          downloads the wheels, builds the benchmark binary, the
#                                   worker and the GPU test binaries, splits the ONNX Runtime
#                                   GPU wheel, packs Postgres and RabbitMQ
#                                   (bench/gpu/services.sh); prints the calls
# On the GPU host (repository root; files under /root survive between the calls):
#   bench/gpu/run.sh torch-eager    [carry .gpu-stage/py, .gpu-stage/ort.00] diffusers eager,
#                                   then the float32 ONNX export of the same weights
#   bench/gpu/run.sh export         [carry .gpu-stage/py, .gpu-stage/ort.00] instead of
#                                   torch-eager: only the float32 export, detached
#   bench/gpu/run.sh optimize       [carry .gpu-stage/ort.01] fuse the UNet to float16 while
#                                   diffusers runs under torch.compile(mode="reduce-overhead")
#   bench/gpu/run.sh part NN        [carry .gpu-stage/ort.NN] store one more part
#   bench/gpu/run.sh optimize-rest  fuse the text encoders to float16, and a float16 VAE decoder
#                                   into a second model directory (fused-vae16)
#   bench/gpu/run.sh engine         [carry .gpu-stage/bin] unpack ONNX Runtime, time the fused
#                                   UNet in ONNX Runtime's Python API (plain defaults), run the
#                                   engine on one image under several CUDA settings, with the
#                                   float32 VAE and with the float16 one
#   bench/gpu/run.sh batch          the same with four jobs per run (the dynamic batch) and with
#                                   one request of four images (BATCH_B4=0 leaves that out)
#   bench/gpu/run.sh round N        one job per run, then four, again (engine-*-rN.json)
#   bench/gpu/run.sh trace          the fused UNet's kernel timeline (PyTorch's profiler)
#                                   with and without CUDA graphs, and the text encoders,
#                                   beside NVML's busy counter
#   bench/gpu/run.sh svc NN         [carry .gpu-stage/svc.NN, .gpu-stage/svc.sha256] store one
#                                   part of the services
#   bench/gpu/run.sh worker         [carry .gpu-stage/wbin] start Postgres and RabbitMQ, run the
#                                   worker end to end (bench/gpu/worker_e2e.py)
# ControlNet at full size (its own sequence of calls, after stage):
#   bench/gpu/run.sh cn-torch       [carry .gpu-stage/py, .gpu-stage/ort.00] diffusers eager with
#                                   and without a full-size ControlNet (bench/gpu/controlnet_bench.py),
#                                   then the ControlNet's float32 ONNX export; with a second GPU,
#                                   SDXL's float32 export runs there meanwhile (detached)
#   bench/gpu/run.sh cn-prepare     [carry .gpu-stage/ort.01] start, in the background, the
#                                   float32 export of SDXL with the residual UNet, then the
#                                   float16 fusions (fused-cn, cn-fused): about 17 minutes
#   bench/gpu/run.sh wait cn-prepare   follow it (up to 9.5 minutes per call; exit 3: not done)
#   bench/gpu/run.sh part NN        as above, for each further part
#   bench/gpu/run.sh cn-engine      [carry .gpu-stage/bin] the residual UNet alone in ONNX
#                                   Runtime's Python API (step, NVML busy), the engine with the
#                                   ControlNet (with and without its CUDA graph), and the same
#                                   model without it (guidance and scheduler on the host, then
#                                   on the device), then four jobs per run without it
#   bench/gpu/run.sh zero-probe     [carry .gpu-stage/bin] (once the ONNX Runtime parts are
#                                   stored) zeroing the residual UNet's ControlNet inputs on the
#                                   host or on the device (bench/gpu/zero_fill_probe.py)
#   bench/gpu/run.sh gpu-tests      [carry .gpu-stage/tbin] (once the ONNX Runtime parts are
#                                   stored) the CPU test suite's parity and
#                                   device-binding tests on the GPU (SDXL_TEST_DEVICE=cuda:0, or
#                                   GPU_TEST_DEVICE)
# Results land in $OUT (or ./out) as JSON; bench/gpu/collect.py merges them into bench/results/.
set -euo pipefail
cmd="${1:?usage: run.sh stage|torch-eager|optimize|part NN|optimize-rest|engine|batch|round N|trace|svc NN|worker|cn-torch|cn-prepare|wait NAME|cn-engine|gpu-tests|zero-probe}"
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
out="${OUT:-$root/out}"
work=/root/sdxl-bench
ort_version=1.31.1
mkdir -p "$out"

stash_part() {
  mkdir -p "$work/stage"
  cp ".gpu-stage/ort.$1" "$work/stage/"
  ls -la "$work/stage"
}

unpack_ort() {
  whl="$work/stage/ort.whl"
  if [ ! -f "$work/ortx/onnxruntime/capi/libonnxruntime.so.$ort_version" ]; then
    cat "$work"/stage/ort.[0-9]* > "$whl"
    # The checksum travels with the engine binary (bin), the test binaries (tbin) and the
    # worker (wbin).
    sum=$(cat .gpu-stage/bin/ort.sha256 .gpu-stage/tbin/ort.sha256 .gpu-stage/wbin/ort.sha256 \
      2>/dev/null | head -1 || true)
    echo "$sum  $whl" | sha256sum -c -
    rm -rf "$work/ortx" && mkdir -p "$work/ortx"
    python3 -c "import zipfile,sys; z=zipfile.ZipFile(sys.argv[1]); [z.extract(n,'$work/ortx') for n in z.namelist() if '/capi/lib' in n]" "$whl"
  fi
  export ORT_DYLIB_PATH=$work/ortx/onnxruntime/capi/libonnxruntime.so.$ort_version
}

# Run a command in its own process session (it outlives the call); `wait NAME` follows it.
detach() {
  local name="$1"; shift
  rm -f "$work/$name.rc"
  setsid nohup bash -c "$(printf '%q ' "$@"); echo \$? > '$work/$name.rc'" \
    > "$work/$name.log" 2>&1 < /dev/null &
  echo "started $name (pid $!); follow it with: bench/gpu/run.sh wait $name"
}

# A copy of the scripts a detached job needs, so that it outlives the call's working tree.
copy_code() {
  local code="$work/code"
  rm -rf "$code" && mkdir -p "$code/tests/fixtures/tiny-sdxl"
  cp -r bench onnx "$code/" && cp -r tests/fixtures/tiny-sdxl/tokenizer* "$code/tests/fixtures/tiny-sdxl/"
}

python_env() {
  mkdir -p /tmp/site
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$work"/py/*.whl
  export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
}

# ONNX Runtime's Python package from the unpacked wheel in /tmp/ortpy, and the Python wheels.
ort_python() {
  unpack_ort
  if [ ! -f /tmp/ortpy/.done ]; then
    rm -rf /tmp/ortpy && mkdir -p /tmp/ortpy
    python3 -c "import zipfile,sys; zipfile.ZipFile(sys.argv[1]).extractall('/tmp/ortpy')" \
      "$work/stage/ort.whl"
    touch /tmp/ortpy/.done
  fi
  python_env
}

# Time a fused UNet in ONNX Runtime's Python API (bench/gpu/ort_probe.py) with default CUDA
# options, then with CUDA graphs, reading NVML's busy counter meanwhile: ort_probe MODEL WHAT OUT.
ort_probe() {
  ort_python
  { PYTHONPATH=/tmp/ortpy:/tmp/site python3 bench/gpu/ort_probe.py "$1"
    PYTHONPATH=/tmp/ortpy:/tmp/site python3 bench/gpu/ort_probe.py "$1" '{"enable_cuda_graph": "1"}'
  } | python3 -c "
import json, sys
lines = [json.loads(l) for l in sys.stdin if l.startswith('{')]
json.dump({'what': sys.argv[2] + ' in ONNX Runtime $ort_version Python API '
           '(bench/gpu/ort_probe.py): IoBinding on the GPU, batch 2, 128x128 latents, '
           'default CUDA execution provider options, then with CUDA graphs; median of 10 after 3 '
           'warm-up runs; busy_percent: NVML utilization over 3 s of back-to-back runs',
           'results': lines}, open(sys.argv[1], 'w'), indent=1)
print(lines)" "$3" "$2" || true
}

case "$cmd" in
  stage)
    mkdir -p .gpu-stage/py .gpu-stage/bin .gpu-stage/whl
    grep -qx '/.gpu-stage/' .git/info/exclude 2>/dev/null || echo '/.gpu-stage/' >> .git/info/exclude
    pip_get() {
      python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 -d "$1" "$2"
    }
    pip_get .gpu-stage/py diffusers==0.42.1
    pip_get .gpu-stage/py numpy==2.3.5        # the UNet attention fusion needs numpy < 2.4
    pip_get .gpu-stage/py importlib_metadata
    pip_get .gpu-stage/py zipp
    pip_get .gpu-stage/py nvidia-ml-py         # NVML's busy counter in bench/gpu/ort_probe.py
    pip_get .gpu-stage/whl "onnxruntime-gpu==$ort_version"
    whl=$(ls .gpu-stage/whl/onnxruntime_gpu-"$ort_version"-*.whl)
    rm -f .gpu-stage/ort.*
    head -c 16000000 "$whl" > .gpu-stage/ort.00
    tail -c +16000001 "$whl" | split -b 40000000 -d -a 2 --numeric-suffixes=1 - .gpu-stage/ort.
    sha256sum "$whl" | cut -d' ' -f1 > .gpu-stage/bin/ort.sha256
    # The dev profile's dependencies (opt-level 2) with the crate itself at opt-level 3: shares
    # the test build's compiled dependencies. All heavy work runs inside ONNX Runtime anyway.
    CARGO_PROFILE_DEV_OPT_LEVEL=3 cargo build --bench gpu_engine --bin sdxl-worker 2>&1 | tail -2
    bin=$(ls -t "${CARGO_TARGET_DIR:-target}"/debug/deps/gpu_engine-* | grep -v '\.d$' | head -1)
    strip -o .gpu-stage/bin/gpu_engine "$bin"
    xz -T0 -6 -f .gpu-stage/bin/gpu_engine
    # The tests worth running on the GPU: parity with diffusers and the device-binding paths.
    rm -rf .gpu-stage/tbin && mkdir -p .gpu-stage/tbin
    echo "$root" > .gpu-stage/tbin/root
    for t in parity engine_binding controlnet_parity; do
      cargo test --test "$t" --no-run 2>&1 | tail -1
      bin=$(ls -t "${CARGO_TARGET_DIR:-target}"/debug/deps/"$t"-* | grep -v '\.d$' | head -1)
      strip -o ".gpu-stage/tbin/$t" "$bin" && xz -T0 -6 -f ".gpu-stage/tbin/$t"
    done
    cp .gpu-stage/bin/ort.sha256 .gpu-stage/tbin/
    mkdir -p .gpu-stage/wbin
    strip -o .gpu-stage/wbin/sdxl-worker "${CARGO_TARGET_DIR:-target}"/debug/sdxl-worker
    xz -T0 -6 -f .gpu-stage/wbin/sdxl-worker
    cp .gpu-stage/bin/ort.sha256 .gpu-stage/wbin/
    [ -f .gpu-stage/svc.sha256 ] || bench/gpu/services.sh stage
    ls -la .gpu-stage/py .gpu-stage/bin .gpu-stage/wbin .gpu-stage/ort.* .gpu-stage/svc.*
    echo "calls: torch-eager [py, ort.00]; optimize [ort.01]; part NN for each further part;"
    echo "       engine [bin]; batch; svc NN for each services part; worker [wbin]"
    echo "ControlNet: cn-torch [py, ort.00]; cn-prepare [ort.01]; part NN; wait cn-prepare;"
    echo "       cn-engine [bin]; gpu-tests [tbin]; svc NN; worker with E2E_CONTROLNET [wbin]"
    ;;
  torch-eager)
    mkdir -p "$work/py" && cp .gpu-stage/py/*.whl "$work/py/"
    stash_part 00
    python_env
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.csv"
    python3 bench/gpu/torch_bench.py --mode eager --out "$out" --export "$work/fp32"
    cp "$out/torch-eager.json" "$work/"
    ;;
  export)
    # Only the float32 export of the same weights, no timings, detached (`wait export`): for
    # runs that need the model and nothing else.
    mkdir -p "$work/py" && cp .gpu-stage/py/*.whl "$work/py/"
    stash_part 00
    python_env
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.csv"
    copy_code
    detach export bash -c "cd '$work/code' \
      && python3 bench/gpu/torch_bench.py --mode none --out '$work' --export '$work/fp32'"
    ;;
  optimize)
    stash_part 01
    python_env
    python3 bench/gpu/optimize_unet.py "$work/fp32" "$work/fused" > "$out/optimize.log" 2>&1 &
    opt=$!
    python3 bench/gpu/torch_bench.py --mode compile --out "$out" 2>&1 | grep -v Warning || true
    cp "$out/torch-compile.json" "$work/" || true
    wait "$opt"; cat "$out/optimize.log"
    tail -1 "$out/optimize.log" > "$work/optimize.json"
    du -sh "$work"/fused/unet
    ;;
  part)
    stash_part "${2:?part number}"
    ;;
  optimize-rest)
    python_env
    python3 bench/gpu/optimize_unet.py --rest "$work/fp32" "$work/fused" "$work/fused-vae16" \
      | tee "$work/optimize-rest.json"
    ;;
  engine)
    rm -rf "$work/ortx"
    unpack_ort
    xz -dc .gpu-stage/bin/gpu_engine.xz > "$work/gpu_engine" && chmod +x "$work/gpu_engine"
    cp "$work"/*.json "$out/" 2>/dev/null || true
    # ONNX Runtime's own Python API on the same fused UNet: its default CUDA settings, then
    # with CUDA graph replay (and the busy ratio of replay alone).
    ort_probe "$work/fused/unet/model.onnx" "The fused float16 UNet" "$out/ort-python-probe.json"
    cp "$out/ort-python-probe.json" "$work/" 2>/dev/null || true
    BENCH_MODEL="$work/fused" BENCH_OUT="$out/engine-b1.json" \
      BENCH_VARIANTS="${BENCH_VARIANTS:-default,tf32,graph,graph+tf32,graph+tf32+host_step}" \
      "$work/gpu_engine" --bench
    cp "$out/engine-b1.json" "$work/"
    if [ -d "$work/fused-vae16" ]; then
      BENCH_MODEL="$work/fused-vae16" BENCH_OUT="$out/engine-b1-vae16.json" \
        BENCH_VARIANTS="${BENCH_VARIANTS_VAE16:-default,graph}" "$work/gpu_engine" --bench
      cp "$out/engine-b1-vae16.json" "$work/"
    fi
    ;;
  batch)
    export ORT_DYLIB_PATH=$work/ortx/onnxruntime/capi/libonnxruntime.so.$ort_version
    cp "$work"/*.json "$out/" 2>/dev/null || true
    BENCH_MODEL="$work/fused" BENCH_OUT="$out/engine-jobs4.json" BENCH_JOBS=4 BENCH_RUNS=2 \
      BENCH_VARIANTS="${BENCH_VARIANTS:-default,tf32}" "$work/gpu_engine" --bench
    cp "$out/engine-jobs4.json" "$work/"
    if [ "${BATCH_B4:-1}" = 1 ]; then
      BENCH_MODEL="$work/fused" BENCH_OUT="$out/engine-b4.json" BENCH_IMAGES=4 BENCH_RUNS=2 \
        BENCH_VARIANTS="${BENCH_VARIANTS:-default}" "$work/gpu_engine" --bench
      cp "$out/engine-b4.json" "$work/"
    fi
    ;;
  round)
    # One more round of single jobs and four-job batches, back to back on the same host
    # (engine-b1-rN.json, engine-jobs4-rN.json; collect.py pairs them): the single-job rate
    # moves from run to run more than the batched one.
    n="${2:?round number}"
    export ORT_DYLIB_PATH=$work/ortx/onnxruntime/capi/libonnxruntime.so.$ort_version
    BENCH_MODEL="$work/fused" BENCH_OUT="$out/engine-b1-r$n.json" \
      BENCH_VARIANTS="${BENCH_VARIANTS:-graph+tf32}" "$work/gpu_engine" --bench
    BENCH_MODEL="$work/fused" BENCH_OUT="$out/engine-jobs4-r$n.json" BENCH_JOBS=4 BENCH_RUNS=2 \
      BENCH_VARIANTS="${BENCH_VARIANTS:-graph+tf32}" "$work/gpu_engine" --bench
    cp "$out/engine-b1-r$n.json" "$out/engine-jobs4-r$n.json" "$work/"
    ;;
  trace)
    # The fused UNet's own GPU timeline under PyTorch's profiler, with and without ONNX
    # Runtime's CUDA graphs (bench/gpu/kernel_trace.py): what limits the busy ratio.
    ort_python
    PYTHONPATH=/tmp/ortpy:/tmp/site python3 bench/gpu/kernel_trace.py \
      "$out/kernel-trace.json" "${TRACE_RUNS:-20}" "$work/fused/unet/model.onnx" \
      "$work/fused/text_encoder/model.onnx" "$work/fused/text_encoder_2/model.onnx"
    cp "$out/kernel-trace.json" "$work/"
    ;;
  cn-torch)
    mkdir -p "$work/py" && cp .gpu-stage/py/*.whl "$work/py/"
    stash_part 00
    python_env
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.csv"
    # On a host with a second GPU, the float32 export of SDXL with its residual UNet (about 6
    # minutes) runs there, in its own process session, while diffusers is timed on the first;
    # cn-prepare then waits for it instead of exporting.
    if [ "$(nvidia-smi -L | grep -c '^GPU')" -ge 2 ]; then
      copy_code
      detach cn-export env CUDA_VISIBLE_DEVICES=1 bash -c "cd '$work/code' \
        && python3 bench/gpu/controlnet_bench.py --export '$work/fp32'"
    fi
    python3 bench/gpu/controlnet_bench.py --out "$out" --export-controlnet "$work/cn-fp32" \
      2>&1 | grep -v Warning || true
    cp "$out/torch-controlnet.json" "$work/"
    du -sh "$work/cn-fp32"
    ;;
  cn-prepare)
    # The float32 export of SDXL with its residual UNet (about 6 minutes), then the float16
    # fusions of the residual UNet, the ControlNet and the text encoders in parallel (the
    # residual UNet's alone took 9.5 minutes of fusion passes and more to write on 2026-11-29):
    # longer than one call may run, so it runs in its own process session, which outlives the
    # call while the host stays warm, from a copy of the scripts it needs; `wait cn-prepare`
    # follows it, and other steps (parts, services, gpu-tests) can run meanwhile.
    stash_part 01
    python_env
    if [ -f "$work/cn-export.log" ]; then
      # cn-torch started the export on the second GPU: wait for it, then fuse.
      export_step="while [ ! -f '$work/cn-export.rc' ]; do sleep 5; done; \
        cat '$work/cn-export.log'; [ \"\$(cat '$work/cn-export.rc')\" = 0 ]"
    else
      copy_code
      export_step="python3 bench/gpu/controlnet_bench.py --export '$work/fp32'"
    fi
    detach cn-prepare bash -c "cd '$work/code' && { $export_step; } \
      && python3 bench/gpu/optimize_unet.py --controlnet '$work/fp32' '$work/fused-cn' \
           '$work/cn-fp32' '$work/cn-fused'"
    ;;
  wait)
    name="${2:?job name}"
    for _ in $(seq 1 57); do
      [ -f "$work/$name.rc" ] && break
      sleep 10
    done
    tr '\r' '\n' < "$work/$name.log" | grep -v '^fusion' | tail -5 | cut -c1-2000
    tr '\r' '\n' < "$work/$name.log" | { grep '^fusion' || true; } | tail -1
    if [ ! -f "$work/$name.rc" ]; then echo "$name still running"; exit 3; fi
    cp "$work/$name.log" "$out/"
    [ "$name" = cn-prepare ] && tail -1 "$work/$name.log" > "$work/optimize-cn.json"
    exit "$(cat "$work/$name.rc")"
    ;;
  cn-engine)
    unpack_ort
    xz -dc .gpu-stage/bin/gpu_engine.xz > "$work/gpu_engine" && chmod +x "$work/gpu_engine"
    cp "$work"/*.json "$out/" 2>/dev/null || true
    # The residual UNet alone in ONNX Runtime's Python API, zero residuals, default CUDA options
    # and CUDA graphs: its step and the NVML busy ratio of nothing but its replay.
    if [ "${CN_PROBE:-1}" = 1 ]; then
      ort_probe "$work/fused-cn/unet/model_controlnet.onnx" \
        "The fused float16 residual UNet (fused-cn) with zero ControlNet residuals" \
        "$out/ort-python-probe-cn.json"
      cp "$out/ort-python-probe-cn.json" "$work/" 2>/dev/null || true
    fi
    BENCH_MODEL="$work/fused-cn" BENCH_CONTROLNET="$work/cn-fused" \
      BENCH_OUT="$out/engine-controlnet.json" \
      BENCH_VARIANTS="${BENCH_VARIANTS:-tf32,graph+tf32+cn_nograph,graph+tf32}" "$work/gpu_engine" --bench
    cp "$out/engine-controlnet.json" "$work/"
    BENCH_MODEL="$work/fused-cn" BENCH_OUT="$out/engine-controlnet-off.json" \
      BENCH_VARIANTS="${BENCH_VARIANTS_OFF:-graph+tf32+host_step,graph+tf32}" "$work/gpu_engine" --bench
    cp "$out/engine-controlnet-off.json" "$work/"
    # The dynamic batch on the same model: four jobs per run, as a worker with max_batch 4
    # (CN_JOBS4=0 leaves it out).
    if [ "${CN_JOBS4:-1}" = 1 ]; then
      BENCH_MODEL="$work/fused-cn" BENCH_OUT="$out/engine-controlnet-off-jobs4.json" BENCH_JOBS=4 \
        BENCH_RUNS=2 BENCH_VARIANTS="${BENCH_VARIANTS_OFF_JOBS4:-graph+tf32}" "$work/gpu_engine" --bench
      cp "$out/engine-controlnet-off-jobs4.json" "$work/"
    fi
    ;;
  gpu-tests)
    unpack_ort
    # The test binaries find the fixtures under the repository they were built in.
    built_in="$(cat .gpu-stage/tbin/root)"
    if [ "$built_in" != "$root" ]; then
      mkdir -p "$(dirname "$built_in")" && rm -rf "$built_in" && ln -s "$root" "$built_in"
    fi
    status=0
    for t in .gpu-stage/tbin/*.xz; do
      name=$(basename "$t" .xz)
      xz -dc "$t" > "$work/$name" && chmod +x "$work/$name"
      echo "== $name"
      SDXL_TEST_DEVICE="${GPU_TEST_DEVICE:-cuda:0}" "$work/$name" --test-threads 1 2>&1 | tail -40 | tee "$out/test-$name.log" \
        || status=1
      grep -q "test result: ok" "$out/test-$name.log" || status=1
    done
    exit $status
    ;;
  zero-probe)
    # Zeroing the residual UNet's ControlNet inputs on the host or on the device, side by side
    # (bench/gpu/zero_fill_probe.py, ONNX Runtime's Python API); after the ONNX Runtime parts.
    unpack_ort
    rm -rf /tmp/ortpy && mkdir -p /tmp/ortpy
    python3 -c "import zipfile,sys; zipfile.ZipFile(sys.argv[1]).extractall('/tmp/ortpy')" \
      "$work/stage/ort.whl"
    PYTHONPATH=/tmp/ortpy python3 bench/gpu/zero_fill_probe.py | tee "$out/zero-fill-probe.json"
    ;;
  svc)
    BENCH_WORK="$work" bench/gpu/services.sh stash "${2:?part number}"
    ;;
  worker)
    unpack_ort
    xz -dc .gpu-stage/wbin/sdxl-worker.xz > "$work/sdxl-worker" && chmod +x "$work/sdxl-worker"
    BENCH_WORK="$work" bench/gpu/services.sh start
    python3 bench/gpu/worker_e2e.py --bin "$work/sdxl-worker" --model "${E2E_MODEL:-$work/fused}" \
      --out "$out/${E2E_NAME:-worker-e2e}.json" --jobs "${E2E_JOBS:-12}" \
      --scenarios "${E2E_SCENARIOS:-1:2,4:8}" ${E2E_CONTROLNET:+--controlnet "$E2E_CONTROLNET"}
    BENCH_WORK="$work" bench/gpu/services.sh stop || true
    ;;
  *) echo "unknown command $cmd" >&2; exit 2 ;;
esac

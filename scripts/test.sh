#!/usr/bin/env bash
# The test command: prepares what the test suite talks to, then runs every test target.
#
#   scripts/test.sh [extra cargo test arguments]
#
# - installs ONNX Runtime's CPU library (scripts/setup-ort.sh) and points ORT_DYLIB_PATH at it;
# - installs the Python tools the tests drive (moto's S3 server, pika, jsonschema,
#   openapi-spec-validator, onnx and onnxruntime) and Debian's chromium (the status page test)
#   when they are missing;
# - starts the local PostgreSQL and RabbitMQ when they do not answer;
# - runs `cargo test --all-targets`, then the Python tests of the ONNX tools (onnx/test_*.py).
#
# Tests use their own queue prefixes, database schemas and storage prefixes, so they run in
# parallel against the same servers. SDXL_TEST_DATABASE_URL and SDXL_TEST_BROKER_URL point them
# at other servers (then nothing is started here).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

# ONNX Runtime (CPU build), unless ORT_DYLIB_PATH already points at a library.
if [ -z "${ORT_DYLIB_PATH:-}" ] || [ ! -f "${ORT_DYLIB_PATH}" ]; then
  scripts/setup-ort.sh cpu
  ORT_DYLIB_PATH="$root/.ort/lib/libonnxruntime.so.${ORT_VERSION:-1.31.1}"
  export ORT_DYLIB_PATH
fi
echo "ONNX Runtime: $ORT_DYLIB_PATH"

# Python tools used by the tests: moto's S3 server and a foreign AMQP producer (pika).
missing=()
python3 -c "import moto.server, flask_cors" 2>/dev/null || missing+=("moto[server]")
python3 -c "import pika" 2>/dev/null || missing+=("pika")
python3 -c "import jsonschema" 2>/dev/null || missing+=("jsonschema")
python3 -c "import openapi_spec_validator" 2>/dev/null || missing+=("openapi-spec-validator")
# The exporter's graph pass (onnx/test_*.py), with the versions of onnx/requirements.txt.
python3 -c "import onnx.shape_inference, onnxruntime, numpy" 2>/dev/null \
  || missing+=("onnx==1.23.2" "onnxruntime==1.31.1" "numpy==2.3.5")
if [ "${#missing[@]}" -gt 0 ]; then
  echo "Installing ${missing[*]} ..."
  python3 -m pip install -q "${missing[@]}"
fi

# Headless Chromium renders the status page in tests/api.rs.
if ! command -v chromium >/dev/null 2>&1; then
  echo "Installing chromium ..."
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium
fi

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_for_port() {
  local name="$1" port="$2"
  for _ in $(seq 1 60); do
    port_open "$port" && return 0
    sleep 1
  done
  echo "$name does not answer on port $port" >&2
  return 1
}

if [ -z "${SDXL_TEST_DATABASE_URL:-}" ] && ! port_open 5432; then
  echo "Starting PostgreSQL ..."
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start
  wait_for_port PostgreSQL 5432
fi
if [ -z "${SDXL_TEST_BROKER_URL:-}" ] && ! port_open 5672; then
  echo "Starting RabbitMQ ..."
  rabbitmq-server -detached
  wait_for_port RabbitMQ 5672
fi

cargo test --all-targets "$@"
python3 -m unittest discover -s onnx -p "test_*.py"

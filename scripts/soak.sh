#!/usr/bin/env bash
# Soak run (not part of the test suite): pushes many tiny-model jobs through two worker
# processes while faults are injected at random, then checks the rows, the images and the
# queues, and prints the totals.
#
#   scripts/soak.sh [JOBS] [SECONDS_BETWEEN_FAULTS]        (defaults: 2000 jobs, a fault every 4 s)
#
# It starts a private PostgreSQL cluster and a private RabbitMQ node on free ports in a
# temporary directory (the shared servers are never touched), and runs the debug binary
# (SDXL_BIN overrides it; build it first with `cargo build`). Faults, one at a time:
#   kill    SIGKILL a worker mid-job, start it again
#   term    SIGTERM a worker (graceful stop with a 2 s grace period), start it again
#   broker  rabbitmqctl stop_app, 2 s, start_app
#   pg      PostgreSQL stopped (fast: every connection cut), 2 s, started
# About 1 % of the messages are invalid on purpose (they must end failed with a reason).
# Exit status 0 when every check holds.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
jobs="${1:-2000}"
fault_every="${2:-4}"
bin="${SDXL_BIN:-$root/target/debug/sdxl-worker}"
[ -x "$bin" ] || { echo "no worker binary at $bin (run cargo build)" >&2; exit 2; }
if [ -z "${ORT_DYLIB_PATH:-}" ]; then
  export ORT_DYLIB_PATH="$root/.ort/lib/libonnxruntime.so.${ORT_VERSION:-1.31.1}"
fi

work="$(mktemp -d /tmp/sdxl-soak.XXXXXX)"
chmod 755 "$work"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_port() { for _ in $(seq 1 600); do port_open "$1" && return 0; sleep 0.1; done; echo "port $1 never opened" >&2; return 1; }

# --- private PostgreSQL ---
pg_bin="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)"
pg_port="$(free_port)"
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
mkdir -p "$work/pg"; [ "$(id -u)" = 0 ] && chown postgres "$work/pg"
as_pg "$pg_bin/initdb" -D "$work/pg/data" -A trust -U postgres --no-sync >/dev/null
pg_start() {
  as_pg "$pg_bin/pg_ctl" -D "$work/pg/data" -l "$work/pg/log" -w \
    -o "-p $pg_port -k $work/pg -c listen_addresses=127.0.0.1 -c fsync=off" start >/dev/null
}
pg_stop() { as_pg "$pg_bin/pg_ctl" -D "$work/pg/data" -m "${1:-fast}" -w stop >/dev/null; }
pg_start
db_url="postgres://postgres@127.0.0.1:$pg_port/postgres"
psql_q() { psql "$db_url" -At -c "$1"; }

# --- private RabbitMQ node ---
amqp_port="$(free_port)"; dist_port="$(free_port)"
node="sdxl-soak-$$@localhost"
mkdir -p "$work/rmq"
echo "listeners.tcp.default = 127.0.0.1:$amqp_port" > "$work/rmq/rabbitmq.conf"
echo "[]." > "$work/rmq/enabled_plugins"; echo "[]." > "$work/rmq/advanced.config"; : > "$work/rmq/env.conf"
head -c 20 /dev/urandom | base64 | tr -dc A-Za-z > "$work/rmq/.erlang.cookie"; chmod 400 "$work/rmq/.erlang.cookie"
rmq_env() {
  env HOME="$work/rmq" RABBITMQ_NODENAME="$node" RABBITMQ_NODE_PORT="$amqp_port" \
    RABBITMQ_DIST_PORT="$dist_port" RABBITMQ_MNESIA_BASE="$work/rmq/mnesia" \
    RABBITMQ_LOG_BASE="$work/rmq/log" RABBITMQ_CONFIG_FILE="$work/rmq/rabbitmq" \
    RABBITMQ_ADVANCED_CONFIG_FILE="$work/rmq/advanced.config" \
    RABBITMQ_ENABLED_PLUGINS_FILE="$work/rmq/enabled_plugins" \
    RABBITMQ_CONF_ENV_FILE="$work/rmq/env.conf" ERL_EPMD_ADDRESS=127.0.0.1 "$@"
}
rmq_bin=/usr/lib/rabbitmq/bin
rmq_env "$rmq_bin/rabbitmq-server" > "$work/rmq/server.out" 2>&1 &
rmq_pid=$!
wait_port "$amqp_port"
rmqctl() { rmq_env "$rmq_bin/rabbitmqctl" -n "$node" -q "$@"; }
amqp_url="amqp://guest:guest@127.0.0.1:$amqp_port/%2f"

worker_pids=("" "")
cleanup() {
  for pid in "${worker_pids[@]}"; do [ -n "$pid" ] && kill -KILL "$pid" 2>/dev/null || true; done
  rmqctl stop >/dev/null 2>&1 || true
  kill -TERM "$rmq_pid" 2>/dev/null || true; wait "$rmq_pid" 2>/dev/null || true
  pg_stop immediate 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

export SDXL_BROKER_URL="$amqp_url" SDXL_BROKER_PREFIX=soak SDXL_DATABASE_URL="$db_url"
export SDXL_STORAGE_BACKEND=local SDXL_STORAGE_PATH="$work/images" SDXL_WORKER_DEVICES=cpu
export SDXL_MODELS_DEFAULT=tiny-sdxl SDXL_MODELS_AVAILABLE="tiny-sdxl=$root/tests/fixtures/tiny-sdxl"
export SDXL_WORKER_POLL_INTERVAL_MS=20 SDXL_WORKER_SHUTDOWN_GRACE_MS=2000
export SDXL_WORKER_HEARTBEAT_INTERVAL_MS=500 SDXL_WORKER_LEASE_MS=5000 SDXL_WORKER_LEASE_SWEEP_INTERVAL_MS=1000
export SDXL_WORKER_MAX_ATTEMPTS=10 SDXL_BROKER_DELIVERY_LIMIT=20 SDXL_LOG_LEVEL=warn
unset SDXL_CONFIG RUST_LOG

start_worker() {
  SDXL_WORKER_ID="soak-$1" "$bin" worker >> "$work/worker-$1.log" 2>&1 &
  worker_pids[$1]=$!
}
start_worker 0; start_worker 1
sleep 2

echo "publishing $jobs jobs ..."
started=$(date +%s)
python3 - "$amqp_url" "$jobs" "$work/ids" <<'PY'
import json, random, sys, uuid, pika
url, n, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
conn = pika.BlockingConnection(pika.URLParameters(url))
ch = conn.channel(); ch.confirm_delivery()
rng = random.Random(7)
with open(out, "w") as f:
    for i in range(n):
        jid = str(uuid.uuid4())
        if rng.random() < 0.01:
            body = {"version": 1, "id": jid, "prompt": "x", "width": 65, "height": 64}
            kind = "invalid"
        else:
            body = {"version": 1, "id": jid, "prompt": f"soak job {i}", "width": 64, "height": 64,
                    "steps": rng.choice([2, 3, 4]), "priority": rng.choice([0, 0, 0, 6])}
            kind = "good"
        ch.basic_publish("soak.jobs", "", json.dumps(body).encode(),
                         pika.BasicProperties(message_id=jid, delivery_mode=2), mandatory=True)
        f.write(f"{jid} {kind}\n")
conn.close()
PY
good=$(grep -c ' good$' "$work/ids" || true); invalid=$(grep -c ' invalid$' "$work/ids" || true)

declare -A faults=([kill]=0 [term]=0 [broker]=0 [pg]=0)
deadline=$(( $(date +%s) + ${SOAK_TIMEOUT_S:-3600} ))
while :; do
  done_count=$(psql_q "select count(*) from jobs where state in ('succeeded','failed','cancelled')" 2>/dev/null || echo 0)
  [ "$done_count" -ge "$jobs" ] && break
  [ "$(date +%s)" -ge "$deadline" ] && { echo "timed out waiting for the jobs" >&2; break; }
  sleep "$fault_every"
  for i in 0 1; do  # a worker that exited on its own is restarted (and counted)
    kill -0 "${worker_pids[$i]}" 2>/dev/null || start_worker "$i"
  done
  case $(( RANDOM % 4 )) in
    0) i=$(( RANDOM % 2 )); kill -KILL "${worker_pids[$i]}" 2>/dev/null || true
       wait "${worker_pids[$i]}" 2>/dev/null || true; start_worker "$i"; faults[kill]=$(( faults[kill] + 1 )) ;;
    1) i=$(( RANDOM % 2 )); kill -TERM "${worker_pids[$i]}" 2>/dev/null || true
       wait "${worker_pids[$i]}" 2>/dev/null || true; start_worker "$i"; faults[term]=$(( faults[term] + 1 )) ;;
    2) rmqctl stop_app >/dev/null; sleep 2; rmqctl start_app >/dev/null; faults[broker]=$(( faults[broker] + 1 )) ;;
    3) pg_stop fast; sleep 2; pg_start; faults[pg]=$(( faults[pg] + 1 )) ;;
  esac
  echo "  $(date +%T) done $done_count/$jobs; faults: kill ${faults[kill]} term ${faults[term]} broker ${faults[broker]} pg ${faults[pg]}"
done
# Let the last redeliveries settle, then stop the workers gracefully.
sleep 5
for i in 0 1; do kill -TERM "${worker_pids[$i]}" 2>/dev/null || true; wait "${worker_pids[$i]}" 2>/dev/null || true; worker_pids[$i]=""; done
elapsed=$(( $(date +%s) - started ))

rows=$(psql_q "select count(*) from jobs")
succeeded=$(psql_q "select count(*) from jobs where state = 'succeeded'")
failed=$(psql_q "select count(*) from jobs where state = 'failed'")
failed_invalid=$(psql_q "select count(*) from jobs where state = 'failed' and error_code = 'invalid_request'")
failed_other=$(psql_q "select coalesce(string_agg(error_code || ' ' || n, ', '), 'none') from (select error_code, count(*) n from jobs where state = 'failed' and error_code <> 'invalid_request' group by 1) t")
unfinished=$(psql_q "select count(*) from jobs where state in ('queued','running')")
retried=$(psql_q "select count(*) from jobs where attempt > 1")
max_attempt=$(psql_q "select coalesce(max(attempt), 0) from jobs")
metrics=$(psql_q "select count(*) from job_metrics")
no_metrics=$(psql_q "select count(*) from jobs j where state = 'succeeded' and not exists (select 1 from job_metrics m where m.job_id = j.id)")
missing=0
while read -r key; do [ -f "$work/images/$key" ] || missing=$(( missing + 1 )); done < <(psql_q "select i->>'key' from jobs, jsonb_array_elements(images) i where state = 'succeeded'")
images=$(find "$work/images" -name '*.png' | wc -l)
queues=$(rmqctl list_queues name messages --no-table-headers 2>/dev/null | tr '\t' ' ' | tr '\n' ';')
left=$(rmqctl list_queues name messages --no-table-headers 2>/dev/null | awk '$1 != "soak.dead" {s += $2} END {print s + 0}')
dead=$(rmqctl list_queues name messages --no-table-headers 2>/dev/null | awk '$1 == "soak.dead" {print $2 + 0}')

echo "== soak totals =="
echo "jobs published:        $jobs ($good valid, $invalid invalid) in ${elapsed}s through 2 workers"
echo "faults injected:       SIGKILL ${faults[kill]}, SIGTERM ${faults[term]}, broker stop/start ${faults[broker]}, Postgres restart ${faults[pg]}"
echo "rows:                  $rows (succeeded $succeeded, failed $failed: invalid $failed_invalid, other: $failed_other; unfinished $unfinished)"
echo "retried (attempt > 1): $retried (highest attempt $max_attempt)"
echo "metrics rows:          $metrics (succeeded without metrics: $no_metrics)"
echo "images:                $images files, $missing recorded but missing"
echo "messages left:         $left in work/intake queues, ${dead:-0} dead letters ($queues)"
ok=1
[ "$rows" -eq "$jobs" ] || ok=0
[ "$unfinished" -eq 0 ] || ok=0
[ "$succeeded" -eq "$good" ] || ok=0
[ "$failed_invalid" -eq "$invalid" ] || ok=0
[ "$missing" -eq 0 ] || ok=0
[ "$no_metrics" -eq 0 ] || ok=0
[ "$metrics" -eq "$succeeded" ] || ok=0
[ "$left" -eq 0 ] || ok=0
if [ "$ok" = 1 ]; then echo "result: PASS"; else echo "result: FAIL"; exit 1; fi

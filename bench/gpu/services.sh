#!/usr/bin/env bash
# Postgres and RabbitMQ for the worker on the GPU host, which has neither, has no network and
# lets nothing be installed into /usr, /etc or /var/lib. This script packs both services, as
# Debian 12 installs them on the build machine, into a relocatable archive, carries it over in
# parts small enough for one call each, and runs them from /root/svc with their data in /tmp.
#
# On the build machine (repository root, Postgres 15, Erlang and RabbitMQ installed from Debian):
#   bench/gpu/services.sh stage     packs Postgres 15 (initdb, postgres, pg_ctl, psql, pg_isready,
#                                   its lib/ and share/), Erlang/OTP and RabbitMQ, and every
#                                   non-glibc shared library they load, into .gpu-stage/svc.NN
#                                   (at most 15 MB each) plus .gpu-stage/svc.sha256
# On the GPU host (repository root, as root; only /root survives between calls):
#   bench/gpu/services.sh stash NN  [carry .gpu-stage/svc.NN and .gpu-stage/svc.sha256]
#                                   keeps one part under /root/sdxl-bench/svc-parts
#   bench/gpu/services.sh start     checks and unpacks the parts into /root/svc, starts a fresh
#                                   Postgres (database sdxl, superuser postgres, trust auth) and a
#                                   single-node RabbitMQ (guest/guest from loopback), both on
#                                   127.0.0.1 and detached, waits until both answer
#   bench/gpu/services.sh stop      stops both (the data in /tmp is left for inspection)
#   bench/gpu/services.sh ctl ARGS  rabbitmqctl against the bench node (e.g. `ctl list_queues`)
#   bench/gpu/services.sh psql ARGS psql as postgres on database sdxl
#
# The worker then connects to postgres://postgres@127.0.0.1:$PGPORT/sdxl and
# amqp://guest:guest@127.0.0.1:$AMQP_PORT/%2f.
#
# Settings (environment; the defaults suit the GPU host, change the ports to run next to
# another Postgres or RabbitMQ):
#   PGPORT=5432            Postgres port          AMQP_PORT=5672        RabbitMQ AMQP port
#   RMQ_DIST_PORT=25672    Erlang distribution    ERL_EPMD_PORT=4369    epmd (started by RabbitMQ)
#   RMQ_NODENAME=bench@localhost                  PG_UID=65534          Postgres runs as this uid
#   SVC_ROOT=/root/svc     unpacked services      BENCH_WORK=/root/sdxl-bench  (parts under svc-parts/)
#   SVC_TMP=/tmp/svc       logs, RabbitMQ data, HOME with the Erlang cookie, Postgres' copy
#   PGDATA=/tmp/pgdata     the Postgres cluster (made anew by every start)
# Postgres refuses to run as root, and uid 65534 cannot enter /root (mode 700), so `start` copies
# the Postgres part of /root/svc to $SVC_TMP/pg and runs it from there. The bundled libraries are
# put on LD_LIBRARY_PATH of the service processes only; nothing here changes the caller's
# environment.
set -euo pipefail
cmd="${1:?usage: services.sh stage|stash NN|start|stop|ctl ARGS|psql ARGS}"
shift
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"

svc="${SVC_ROOT:-/root/svc}"
work="${BENCH_WORK:-/root/sdxl-bench}"
parts="$work/svc-parts"
tmp="${SVC_TMP:-/tmp/svc}"
pgdata="${PGDATA:-/tmp/pgdata}"
pgport="${PGPORT:-5432}"
amqp_port="${AMQP_PORT:-5672}"
dist_port="${RMQ_DIST_PORT:-25672}"
epmd_port="${ERL_EPMD_PORT:-4369}"
nodename="${RMQ_NODENAME:-bench@localhost}"
pg_uid="${PG_UID:-65534}"
pg_ver=15

# ---------------------------------------------------------------------------------------------
# stage: build machine
# ---------------------------------------------------------------------------------------------
stage() {
  local pgbin=/usr/lib/postgresql/$pg_ver/bin pglib=/usr/lib/postgresql/$pg_ver/lib
  local pgshare=/usr/share/postgresql/$pg_ver
  local rmq_dir
  rmq_dir=$(cd /usr/lib/rabbitmq/lib && ls -d rabbitmq_server-* | sort -V | tail -1)
  mkdir -p .gpu-stage
  mkdir -p .git/info
  grep -qx '/.gpu-stage/' .git/info/exclude 2>/dev/null || echo '/.gpu-stage/' >> .git/info/exclude
  local st
  st=$(mktemp -d /tmp/svc-stage.XXXXXX)
  trap 'rm -rf "$st"' RETURN
  local s="$st/svc"
  mkdir -p "$s/pg/lib/postgresql/$pg_ver/bin" "$s/pg/share/postgresql" "$s/lib/fallback"

  # Postgres keeps Debian's layout below pg/: it finds share/ relative to its own bin/.
  cp -a "$pgbin"/{initdb,postgres,pg_ctl,psql,pg_isready} "$s/pg/lib/postgresql/$pg_ver/bin/"
  tar -C /usr/lib/postgresql/$pg_ver -cf - --exclude=lib/bitcode --exclude='lib/llvmjit*' lib \
    | tar -C "$s/pg/lib/postgresql/$pg_ver" -xf -
  cp -a "$pgshare" "$s/pg/share/postgresql/"

  # Erlang/OTP and RabbitMQ, without documentation, man pages, examples and sources.
  local drop=(--exclude=doc --exclude=man --exclude=examples --exclude=src --exclude=c_src
              --exclude=include --exclude=emacs --exclude='*.html')
  mkdir -p "$s/erlang" "$s/rabbitmq"
  tar -C /usr/lib/erlang -cf - "${drop[@]}" . | tar -C "$s/erlang" -xf -
  tar -C /usr/lib/rabbitmq/lib -cf - "${drop[@]}" "$rmq_dir" | tar -C "$s/rabbitmq" -xf -
  ln -s "$rmq_dir" "$s/rabbitmq/current"

  # Every shared library the executables, Postgres modules and Erlang NIFs/drivers/port programs
  # load, except glibc's own (the host's glibc is used). libstdc++/libgcc_s go to lib/fallback:
  # Debian's libstdc++ needs glibc 2.36, and every Ubuntu has its own, so they are used only
  # where the host lacks a working one (start decides).
  local glibc_re='^(libc|libm|libdl|librt|libpthread|libresolv|libutil|libanl|libBrokenLocale|libnss_[a-z]+|libmvec|libcrypt|ld-linux-x86-64)\.so'
  find "$s" -type f | while read -r f; do
    if head -c 4 "$f" | grep -q $'\x7fELF'; then ldd "$f" 2>/dev/null || true; fi
  done | awk '$2 == "=>" && $3 ~ /^\// {print $1, $3}' | sort -u | while read -r name path; do
    if [[ "$name" =~ $glibc_re ]]; then continue; fi
    case "$name" in
      libstdc++.so.*|libgcc_s.so.*) cp -L "$path" "$s/lib/fallback/$name" ;;
      *) cp -L "$path" "$s/lib/$name" ;;
    esac
  done
  # libcrypt (libxcrypt) is not part of glibc 2.36 any more but every Ubuntu has libcrypt.so.1;
  # bundle it in the fallback dir as well.
  [ -e /lib/x86_64-linux-gnu/libcrypt.so.1 ] && cp -L /lib/x86_64-linux-gnu/libcrypt.so.1 "$s/lib/fallback/"

  # Erlang's crypto NIF loads OpenSSL's legacy provider from a compiled-in directory; carry it
  # along and point OPENSSL_MODULES at it (see relocate_erlang).
  mkdir -p "$s/lib/ossl-modules"
  cp -L "$(dirname "$(readlink -f /lib/x86_64-linux-gnu/libcrypto.so.3)")/ossl-modules/legacy.so" \
    "$s/lib/ossl-modules/"

  # Check: with lib/ and lib/fallback/ on the path, nothing outside glibc comes from the system.
  local missing
  missing=$(find "$s" -type f | while read -r f; do
      if head -c 4 "$f" | grep -q $'\x7fELF'; then
        LD_LIBRARY_PATH="$s/lib:$s/lib/fallback" ldd "$f" 2>/dev/null | sed "s|^|$f: |" || true
      fi
    done | grep -E '=> (not found|/(usr/)?lib)' | grep -vE "=> /(usr/)?lib[^ ]*/(libc|libm|libdl|librt|libpthread|libresolv|libutil|libanl|libmvec|libBrokenLocale|ld-linux-x86-64)\.so" || true)
  if [ -n "$missing" ]; then echo "libraries not bundled:"; echo "$missing"; exit 1; fi
  local glibc_max
  glibc_max=$(find "$s/lib" "$s/pg" "$s/erlang" -path "$s/lib/fallback" -prune -o -type f -exec sh -c \
      'head -c 4 "$1" | grep -q "ELF" && objdump -T "$1" 2>/dev/null' _ {} \; \
    | grep -o 'GLIBC_2\.[0-9]*' | sort -t. -k2 -n -u | tail -1)

  {
    echo "built on: $(. /etc/os-release; echo "$PRETTY_NAME") glibc $(ldd --version | head -1 | awk '{print $NF}')"
    echo "newest glibc symbol needed outside lib/fallback: $glibc_max"
    echo "postgres: $("$pgbin/postgres" -V)"
    echo "erlang/otp: $(cat /usr/lib/erlang/releases/*/OTP_VERSION | head -1), erts: $(ls /usr/lib/erlang | grep erts-)"
    echo "rabbitmq: ${rmq_dir#rabbitmq_server-}"
  } | tee "$s/VERSIONS"

  local ar="$st/svc.tar.xz"
  tar -C "$st" -cf - svc | xz -T0 -9 > "$ar"
  rm -f .gpu-stage/svc.[0-9]* .gpu-stage/svc.sha256
  split -b 15000000 -d -a 2 "$ar" .gpu-stage/svc.
  ( cd .gpu-stage && sha256sum svc.[0-9]* ) > "$st/parts.sha256"
  { (cd "$st" && sha256sum svc.tar.xz); cat "$st/parts.sha256"; } > .gpu-stage/svc.sha256
  echo "archive: $(stat -c %s "$ar") bytes ($(du -sh "$s" | cut -f1) unpacked)"
  ls -l .gpu-stage/svc.[0-9]*
  cat .gpu-stage/svc.sha256
  local n
  n=$(ls .gpu-stage/svc.[0-9]* | wc -l)
  echo "calls: stash NN for each of the $n parts (carry .gpu-stage/svc.NN and .gpu-stage/svc.sha256), then start"
}

# ---------------------------------------------------------------------------------------------
# helpers for the GPU host
# ---------------------------------------------------------------------------------------------
libpath=""
set_libpath() {
  # lib/ always; lib/fallback/ (Debian's libstdc++, libgcc_s, libcrypt) only where the host
  # cannot run the binaries with its own (postgres -V loads ICU, which needs libstdc++).
  libpath="$svc/lib"
  if ! LD_LIBRARY_PATH="$libpath" "$svc/pg/lib/postgresql/$pg_ver/bin/postgres" -V >/dev/null 2>&1 \
     || LD_LIBRARY_PATH="$libpath" ldd "$svc"/erlang/erts-*/bin/beam.smp "$svc"/erlang/lib/crypto-*/priv/lib/*.so \
        2>&1 | grep -q 'not found'; then
    libpath="$svc/lib:$svc/lib/fallback"
    [ "${1:-}" = quiet ] || echo "using the bundled libstdc++/libgcc_s/libcrypt"
  fi
}

pg_run() {  # as the unprivileged uid, with the bundled libraries
  env LD_LIBRARY_PATH="${libpath//$svc/$tmp/pg}" \
    setpriv --reuid="$pg_uid" --regid="$pg_uid" --clear-groups "$@"
}

pg_client() {  # psql/pg_isready as root (they do not mind), from the copy in $tmp/pg
  env LD_LIBRARY_PATH="${libpath//$svc/$tmp/pg}" "$tmp/pg/pg/lib/postgresql/$pg_ver/bin/$1" "${@:2}"
}

rmq_env() {
  export PATH="$svc/erlang/bin:$PATH"
  export HOME="$tmp/rabbitmq/home"
  export RABBITMQ_NODENAME="$nodename" RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
  export RABBITMQ_NODE_PORT="$amqp_port" RABBITMQ_DIST_PORT="$dist_port" ERL_EPMD_PORT="$epmd_port"
  export RABBITMQ_CONF_ENV_FILE="$tmp/rabbitmq/rabbitmq-env.conf"
  export RABBITMQ_CONFIG_FILE="$tmp/rabbitmq/rabbitmq.conf"
  export RABBITMQ_CONFIG_FILES="$tmp/rabbitmq/conf.d"
  export RABBITMQ_ADVANCED_CONFIG_FILE="$tmp/rabbitmq/advanced.config"
  export RABBITMQ_ENABLED_PLUGINS_FILE="$tmp/rabbitmq/enabled_plugins"
  export RABBITMQ_MNESIA_BASE="$tmp/rabbitmq/mnesia" RABBITMQ_LOG_BASE="$tmp/rabbitmq/log"
  export RABBITMQ_PID_FILE="$tmp/rabbitmq/rabbitmq.pid"
  export RABBITMQ_USE_LONGNAME=false
  # epmd and the distribution listener on loopback only (IPv4: works where IPv6 is off)
  export ERL_EPMD_ADDRESS=127.0.0.1
  export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
  unset RABBITMQ_ENV_LOADED RABBITMQ_SCRIPTS_DIR RABBITMQ_HOME
}

rmq() {  # one of RabbitMQ's sbin scripts (rabbitmqctl, rabbitmq-diagnostics, ...)
  local tool="$1"; shift
  ( rmq_env; "$svc/rabbitmq/current/sbin/$tool" "$@" )
}

relocate_erlang() {
  # Debian's scripts hard-code ROOTDIR=/usr/lib/erlang: point them at $svc/erlang, and give the
  # emulator (and only it) the bundled libraries and OpenSSL modules.
  local f
  for f in "$svc"/erlang/bin/erl "$svc"/erlang/erts-*/bin/erl "$svc"/erlang/bin/start \
           "$svc"/erlang/erts-*/bin/start "$svc"/erlang/releases/RELEASES; do
    [ -f "$f" ] && sed -i "s|/usr/lib/erlang|$svc/erlang|g" "$f"
  done
  for f in "$svc"/erlang/bin/erl "$svc"/erlang/erts-*/bin/erl; do
    sed -i "s|^exec \"\$BINDIR/erlexec\"|LD_LIBRARY_PATH=\"$libpath\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}\"; export LD_LIBRARY_PATH\nOPENSSL_MODULES=\"$svc/lib/ossl-modules\"; export OPENSSL_MODULES\n&|" "$f"
    grep -q "^LD_LIBRARY_PATH=\"$libpath" "$f" || { echo "could not patch $f"; exit 1; }
  done
}

wait_for() {  # seconds description command...
  local n="$1" what="$2"; shift 2
  local i
  for ((i = 0; i < n; i++)); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 1
  done
  echo "$what did not come up within ${n}s"
  return 1
}

tcp_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# ---------------------------------------------------------------------------------------------
start() {
  [ "$(id -u)" = 0 ] || { echo "start runs as root (it drops to uid $pg_uid for Postgres)"; exit 1; }
  for p in "$pgport" "$amqp_port" "$dist_port" "$epmd_port"; do
    if tcp_open "$p"; then echo "port $p is already in use on 127.0.0.1"; exit 1; fi
  done

  # Assemble, check, unpack.
  [ -f "$parts/svc.sha256" ] || cp .gpu-stage/svc.sha256 "$parts/"
  ( cd "$parts" && grep ' svc\.[0-9]*$' svc.sha256 | sha256sum -c --quiet - ) \
    || { echo "a part is missing or damaged in $parts"; exit 1; }
  cat "$parts"/svc.[0-9]* > "$parts/svc.tar.xz"
  ( cd "$parts" && grep ' svc\.tar\.xz$' svc.sha256 | sha256sum -c - )
  rm -rf "$svc" "$tmp"
  mkdir -p "$(dirname "$svc")" "$tmp/logs"
  local up
  up=$(mktemp -d "$(dirname "$svc")/.svc-unpack.XXXXXX")
  tar -C "$up" -xJf "$parts/svc.tar.xz"
  mv "$up/svc" "$svc" && rmdir "$up"
  rm -f "$parts/svc.tar.xz"
  cat "$svc/VERSIONS"
  set_libpath
  relocate_erlang

  # Postgres: a copy the unprivileged uid can read, a fresh cluster, detached postmaster.
  mkdir -p "$tmp/pg"
  cp -a "$svc/pg" "$svc/lib" "$tmp/pg/"
  chmod -R a+rX "$tmp"
  rm -rf "$pgdata"
  mkdir -p "$pgdata"
  chown "$pg_uid:$pg_uid" "$pgdata"
  chmod 700 "$pgdata"
  ( cd /tmp && pg_run "$tmp/pg/pg/lib/postgresql/$pg_ver/bin/initdb" -D "$pgdata" -U postgres \
      --auth=trust -E UTF8 --no-locale ) > "$tmp/logs/initdb.log" 2>&1 \
    || { cat "$tmp/logs/initdb.log"; exit 1; }
  cat >> "$pgdata/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
port = $pgport
unix_socket_directories = ''
max_connections = 200
EOF
  ( cd /tmp && setsid nohup env LD_LIBRARY_PATH="${libpath//$svc/$tmp/pg}" \
      setpriv --reuid="$pg_uid" --regid="$pg_uid" --clear-groups \
      "$tmp/pg/pg/lib/postgresql/$pg_ver/bin/postgres" -D "$pgdata" \
      > "$tmp/logs/postgres.log" 2>&1 < /dev/null & )

  # RabbitMQ: its own config, data, logs and Erlang cookie under $tmp; no plugins.
  mkdir -p "$tmp/rabbitmq/home" "$tmp/rabbitmq/conf.d" "$tmp/rabbitmq/mnesia" "$tmp/rabbitmq/log"
  : > "$tmp/rabbitmq/rabbitmq-env.conf"
  echo '[].' > "$tmp/rabbitmq/enabled_plugins"
  cat > "$tmp/rabbitmq/rabbitmq.conf" <<EOF
listeners.tcp.1 = 127.0.0.1:$amqp_port
loopback_users.guest = true
default_user = guest
default_pass = guest
log.file.level = info
log.console = false
disk_free_limit.absolute = 50MB
EOF
  head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' | tr a-f A-F > "$tmp/rabbitmq/home/.erlang.cookie"
  chmod 400 "$tmp/rabbitmq/home/.erlang.cookie"
  ( rmq_env; cd /tmp && setsid nohup "$svc/rabbitmq/current/sbin/rabbitmq-server" \
      > "$tmp/logs/rabbitmq.log" 2>&1 < /dev/null & )

  # Wait for both.
  if ! wait_for 60 Postgres pg_client pg_isready -q -h 127.0.0.1 -p "$pgport"; then
    tail -20 "$tmp/logs/postgres.log"; exit 1
  fi
  pg_client psql -X -q -h 127.0.0.1 -p "$pgport" -U postgres -d postgres -c 'create database sdxl'
  if ! wait_for 120 RabbitMQ tcp_open "$amqp_port"; then
    tail -30 "$tmp/logs/rabbitmq.log"; tail -30 "$tmp/rabbitmq/log/"*.log 2>/dev/null; exit 1
  fi
  rmq rabbitmqctl -q await_startup --timeout 60
  rmq rabbitmq-diagnostics -q ping

  # Quorum queues need Ra running: declare one, list it, delete it.
  rmq rabbitmqctl -q eval '
    Q = rabbit_misc:r(<<"/">>, queue, <<"svc-check-quorum">>),
    {new, _} = rabbit_amqqueue:declare(Q, true, false,
        [{<<"x-queue-type">>, longstr, <<"quorum">>}], none, <<"services.sh">>),
    ok.' > /dev/null
  rmq rabbitmqctl -q list_queues name type durable | grep -E '^svc-check-quorum[[:space:]]+quorum' \
    || { echo "quorum queue check failed"; exit 1; }
  rmq rabbitmqctl -q delete_queue svc-check-quorum > /dev/null

  echo "postgres: $(pg_client psql -X -At -h 127.0.0.1 -p "$pgport" -U postgres -d sdxl -c 'select version()')"
  echo "  postgres://postgres@127.0.0.1:$pgport/sdxl  (data $pgdata, log $tmp/logs/postgres.log)"
  echo "rabbitmq: $(rmq rabbitmq-diagnostics -q server_version) on Erlang/OTP $(cat "$svc"/erlang/releases/*/OTP_VERSION | head -1), node $nodename"
  echo "  amqp://guest:guest@127.0.0.1:$amqp_port/%2f  (dist $dist_port, epmd $epmd_port, logs $tmp/rabbitmq/log)"
}

stop() {
  local rc=0
  if [ -d "$svc/erlang" ]; then
    set_libpath quiet
    if [ -f "$tmp/rabbitmq/rabbitmq.pid" ] && kill -0 "$(cat "$tmp/rabbitmq/rabbitmq.pid")" 2>/dev/null; then
      # with the pid file, stop waits until the emulator has exited
      rmq rabbitmqctl -q stop "$tmp/rabbitmq/rabbitmq.pid" || rc=1
    fi
    if tcp_open "$epmd_port"; then
      # RabbitMQ's node started epmd on our port; it stays behind otherwise.
      ( rmq_env; LD_LIBRARY_PATH="$libpath" epmd -port "$epmd_port" -kill >/dev/null ) || true
    fi
  fi
  if [ -f "$pgdata/postmaster.pid" ] && kill -0 "$(head -1 "$pgdata/postmaster.pid")" 2>/dev/null; then
    [ -n "$libpath" ] || set_libpath quiet
    if [ -x "$tmp/pg/pg/lib/postgresql/$pg_ver/bin/pg_ctl" ]; then
      ( cd /tmp && pg_run "$tmp/pg/pg/lib/postgresql/$pg_ver/bin/pg_ctl" -D "$pgdata" -m fast -w stop ) || rc=1
    else
      kill -INT "$(head -1 "$pgdata/postmaster.pid")" || rc=1
    fi
  fi
  for p in "$pgport" "$amqp_port" "$dist_port" "$epmd_port"; do
    if tcp_open "$p"; then echo "port $p still in use"; rc=1; fi
  done
  [ "$rc" = 0 ] && echo "stopped"
  return "$rc"
}

case "$cmd" in
  stage) stage ;;
  stash)
    n="${1:?part number, e.g. 00}"
    mkdir -p "$parts"
    cp ".gpu-stage/svc.$n" "$parts/"
    [ -f .gpu-stage/svc.sha256 ] && cp .gpu-stage/svc.sha256 "$parts/"
    ls -l "$parts"
    ;;
  start) start ;;
  stop) stop ;;
  ctl) set_libpath quiet; rmq rabbitmqctl "$@" ;;
  psql) set_libpath quiet; pg_client psql -X -h 127.0.0.1 -p "$pgport" -U postgres -d sdxl "$@" ;;
  *) echo "unknown command $cmd" >&2; exit 2 ;;
esac

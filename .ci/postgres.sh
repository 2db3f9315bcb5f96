#!/usr/bin/env bash
# A throwaway PostgreSQL server for the hub tests: 127.0.0.1 only, trust auth, data in a temp dir,
# run as a non-root user (initdb refuses root).
#
#   eval "$(.ci/postgres.sh)"          # installs postgresql if missing (apt), starts, exports
#                                      #   EDGEPEFT_TEST_POSTGRES (the DSN) and EDGEPEFT_TEST_POSTGRES_DIR
#   .ci/postgres.sh --no-install       # start only; fails if the server binaries are missing
#   .ci/postgres.sh stop "$EDGEPEFT_TEST_POSTGRES_DIR"
#
# Everything but the export lines goes to stderr. In GitHub Actions the variables also go to $GITHUB_ENV.
set -euo pipefail

log() { echo "postgres.sh: $*" >&2; }

find_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }

as_user() {  # run a command as the unprivileged server user when we are root
  if [ "$(id -u)" = 0 ]; then runuser -u "$PGUSER_OS" -- "$@"; else "$@"; fi
}

if [ "${1:-}" = stop ]; then
  dir="${2:?usage: postgres.sh stop DIR}"
  bin="$(find_bin)"
  PGUSER_OS="$(stat -c %U "$dir")"
  as_user "$bin/pg_ctl" -D "$dir/data" -m immediate -w stop >&2 || true
  rm -rf "$dir"
  exit 0
fi

bin="$(find_bin)"
if [ -z "$bin" ] && [ "${1:-}" != --no-install ]; then
  log "installing the Debian package postgresql"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql >&2
  bin="$(find_bin)"
fi
if [ -z "$bin" ]; then
  log "no PostgreSQL server binaries under /usr/lib/postgresql/*/bin; install them: apt-get install -y postgresql"
  exit 1
fi

if [ "$(id -u)" = 0 ]; then
  if id postgres >/dev/null 2>&1; then PGUSER_OS=postgres; else PGUSER_OS=nobody; fi
else
  PGUSER_OS="$(id -un)"
fi

dir="$(mktemp -d /tmp/edgepeft-pg.XXXXXX)"
chmod 700 "$dir"
[ "$(id -u)" = 0 ] && chown "$PGUSER_OS" "$dir"

port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' 2>/dev/null || echo 54329)"

as_user "$bin/initdb" -D "$dir/data" -U edgepeft --auth=trust -E UTF8 --no-sync >"$dir/initdb.log" 2>&1 || {
  cat "$dir/initdb.log" >&2; log "initdb failed"; exit 1; }
# fsync off: a throwaway test server, speed over durability; EDGEPEFT_PG_DURABLE=1 keeps PostgreSQL's durable
# defaults (benchmarks compare it with SQLite at synchronous=FULL)
fast="-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
[ "${EDGEPEFT_PG_DURABLE:-0}" = 1 ] && fast=""
as_user "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
  -o "-c listen_addresses=127.0.0.1 -p $port -k $dir $fast -c max_connections=300" \
  start >&2 || { cat "$dir/server.log" >&2; log "pg_ctl start failed"; exit 1; }

dsn="postgresql://edgepeft@127.0.0.1:$port/postgres"
log "PostgreSQL $("$bin/postgres" --version | awk '{print $NF}') up at $dsn (data in $dir)"
echo "export EDGEPEFT_TEST_POSTGRES=$dsn"
echo "export EDGEPEFT_TEST_POSTGRES_DIR=$dir"
if [ -n "${GITHUB_ENV:-}" ]; then
  echo "EDGEPEFT_TEST_POSTGRES=$dsn" >>"$GITHUB_ENV"
  echo "EDGEPEFT_TEST_POSTGRES_DIR=$dir" >>"$GITHUB_ENV"
fi

#!/usr/bin/env bash
# Start a throwaway PostgreSQL on 127.0.0.1 for the job-store tests (installing Debian's
# package if needed) and print its SQLAlchemy URL. Safe to run twice.
set -euo pipefail
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi
bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
dir=${DITSERVE_PG_DIR:-/tmp/ditserve-pg}
port=${DITSERVE_PG_PORT:-55432}
as_postgres() { runuser -u postgres -- "$@"; }
if ! as_postgres "$bin/pg_ctl" -D "$dir" status >/dev/null 2>&1; then
  rm -rf "$dir" && mkdir -p "$dir" && chown postgres "$dir"
  as_postgres "$bin/initdb" -D "$dir" -A trust -U postgres >/dev/null
  as_postgres "$bin/pg_ctl" -D "$dir" -l "$dir/server.log" -w \
    -o "-p $port -k /tmp -c listen_addresses=127.0.0.1" start >/dev/null
fi
echo "postgresql+psycopg://postgres@127.0.0.1:$port/postgres"

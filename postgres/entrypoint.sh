#!/bin/sh
# Start PostgreSQL 15 as the postgres user: on an empty data directory, first make the cluster (its
# superuser POSTGRES_USER with POSTGRES_PASSWORD, scram-sha-256 everywhere) and the database POSTGRES_DB.
# Listens on 127.0.0.1 and on POSTGRES_LISTEN; accepts password logins from POSTGRES_ALLOW (a CIDR).
set -eu
: "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD}"
user=${POSTGRES_USER:-executor}
db=${POSTGRES_DB:-executor}
listen=${POSTGRES_LISTEN:-127.0.0.1}
allow=${POSTGRES_ALLOW:-127.0.0.1/32}
mkdir -p "$PGDATA" /run/postgresql
chown postgres:postgres "$PGDATA" /run/postgresql
chmod 0700 "$PGDATA"
as_postgres() { setpriv --reuid=postgres --regid=postgres --init-groups "$@"; }
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  pwfile=$(mktemp)
  printf '%s\n' "$POSTGRES_PASSWORD" > "$pwfile"
  chown postgres "$pwfile"
  as_postgres initdb -D "$PGDATA" -U "$user" --pwfile="$pwfile" -A scram-sha-256 -E UTF8 >/dev/null
  rm -f "$pwfile"
  printf 'local all all scram-sha-256\nhost all all 127.0.0.1/32 scram-sha-256\nhost all all %s scram-sha-256\n' \
    "$allow" > "$PGDATA/pg_hba.conf"
  echo "CREATE DATABASE \"$db\"" | as_postgres postgres --single -D "$PGDATA" -j postgres >/dev/null
fi
addresses=127.0.0.1
[ "$listen" = 127.0.0.1 ] || addresses="127.0.0.1,$listen"
exec setpriv --reuid=postgres --regid=postgres --init-groups \
  postgres -D "$PGDATA" -p "$PGPORT" -c listen_addresses="$addresses" -c unix_socket_directories=/run/postgresql

#!/usr/bin/env bash
# Benchmarks spirekeep against the tools an operator would reach for instead
# (pg_dump, mysqldump, sqlite3 .backup, each piped through zstd -3), on the
# same generated SPIRE datastore, in the same run. Not part of the test suite.
#
#   scripts/bench.sh [ENTRIES] [ENGINES...]      e.g. scripts/bench.sh 100000 sqlite postgres mysql
#
# Each pair (spirekeep, then the native tool) runs BENCH_ROUNDS times (2 by
# default), the order alternating from round to round. Restores go into an
# empty database (a new SQLite file).
#
# Prints one Markdown table row per measurement: tool, operation, wall seconds,
# peak RSS, stored bytes. docs/benchmarks.md records the figures and the
# command that produced them.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ENTRIES="${1:-100000}"
shift || true
ENGINES=("${@:-sqlite postgres mysql}")
# shellcheck disable=SC2206
ENGINES=(${ENGINES[*]})

# shellcheck source=scripts/test-services.sh
source scripts/test-services.sh >/dev/null
cargo build --release --quiet --features testkit --bin spirekeep --example generate
SK="$PWD/target/release/spirekeep"
GEN="$PWD/target/release/examples/generate"
PW="$SPIREKEEP_TEST_PASSWORD"
WORK="$(mktemp -d /tmp/spirekeep-bench.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
DB="spirekeep_bench_$$"

# measure LABEL OPERATION OUTPUT-PATH -- command...: wall time and peak RSS of
# the command (children included), and the size of what it wrote.
measure() {
  local tool="$1" op="$2" out="$3"
  shift 4
  /usr/bin/time -f "%e %M" -o "$WORK/time" "$@" >/dev/null 2>"$WORK/stderr" || {
    echo "FAILED: $tool $op" >&2
    cat "$WORK/stderr" >&2
    return 1
  }
  read -r secs kib <"$WORK/time"
  local bytes="-"
  [ -n "$out" ] && bytes="$(du -sb "$out" | cut -f1)"
  # A pipe in a tool's name would split the Markdown cell.
  printf '| %s | %s | %s | %s | %.1f MiB | %s |\n' "$engine" "${tool//|/\\|}" "$op" "$secs" "$(awk -v k="$kib" 'BEGIN{print k/1024}')" "$bytes"
}

# pair ROUND A B: runs the two measurement functions, A first in even
# rounds and B first in odd ones, so neither always gets the warm cache.
pair() {
  if [ $(($1 % 2)) -eq 0 ]; then "$2" && "$3"; else "$3" && "$2"; fi
}

ROUNDS="${BENCH_ROUNDS:-2}"

echo "| engine | tool | operation | seconds | peak RSS | bytes |"
echo "|---|---|---|---|---|---|"
for engine in "${ENGINES[@]}"; do
  repo="$WORK/repo-$engine"
  case "$engine" in
  sqlite)
    src="$WORK/spire.sqlite3"
    "$GEN" --datastore "$src" --entries "$ENTRIES" >/dev/null
    sqlite3 "$src" 'PRAGMA journal_mode=WAL;' >/dev/null
    sk_backup() { rm -rf "$repo"; measure spirekeep backup "$repo" -- "$SK" backup --datastore "$src" --repo "$repo"; }
    native_backup() {
      rm -f "$WORK/copy.db"
      measure "sqlite3 .backup + zstd -3 -T0" backup "$WORK/sqlite.db.zst" -- \
        sh -c "sqlite3 '$src' \".backup '$WORK/copy.db'\" && zstd -q -3 -T0 -f '$WORK/copy.db' -o '$WORK/sqlite.db.zst'"
    }
    sk_restore() {
      rm -f "$WORK/restored.sqlite3"*
      measure spirekeep restore "" -- "$SK" restore latest --repo "$repo" --datastore "$WORK/restored.sqlite3"
    }
    native_restore() {
      rm -f "$WORK/replayed.sqlite3"*
      measure "zstd -dc | sqlite3 (.dump)" restore "" -- \
        sh -c "zstd -q -dc '$WORK/sqlite.sql.zst' | sqlite3 '$WORK/replayed.sqlite3'"
    }
    # The replay needs a SQL dump (the page copy above restores by copying a file).
    sqlite3 "$src" .dump | zstd -q -3 -T0 -f -o "$WORK/sqlite.sql.zst"
    for round in $(seq 0 $((ROUNDS - 1))); do
      pair "$round" sk_backup native_backup
      pair "$round" sk_restore native_restore
    done
    ;;
  postgres)
    # Both ways a PostgreSQL client connects: over TLS (lib/pq's and so SPIRE's default,
    # `sslmode=require`; psql's `prefer` takes TLS too when the server offers it) and
    # without. Each pair runs spirekeep and the native tool on the same data.
    admin="postgres://spirekeep:$PW@127.0.0.1:5432/postgres"
    psql -q "$admin" -c "DROP DATABASE IF EXISTS $DB" -c "CREATE DATABASE $DB" -c "DROP DATABASE IF EXISTS ${DB}_r" -c "CREATE DATABASE ${DB}_r"
    "$GEN" --datastore "postgres://spirekeep:$PW@127.0.0.1:5432/$DB?sslmode=disable" --entries "$ENTRIES" >/dev/null
    # Vacuumed and analysed as a live datastore would be, so autovacuum's first
    # pass over the new tables does not land inside the first measurement.
    psql -q "postgres://spirekeep:$PW@127.0.0.1:5432/$DB" -c "SET client_min_messages = error" -c "VACUUM (ANALYZE)"
    fresh_r() { psql -q "$admin" -c "DROP DATABASE ${DB}_r" -c "CREATE DATABASE ${DB}_r"; }
    sk_backup() { rm -rf "$repo"; measure spirekeep backup "$repo" -- "$SK" backup --datastore "$url" --repo "$repo"; }
    native_backup() {
      measure "pg_dump -Fp | zstd -3 -T0" backup "$WORK/pg.sql.zst" -- \
        sh -c "pg_dump '$url' | zstd -q -3 -T0 -f -o '$WORK/pg.sql.zst'"
    }
    sk_restore() { fresh_r; measure spirekeep restore "" -- "$SK" restore latest --repo "$repo" --datastore "$url_r"; }
    native_restore() {
      fresh_r
      measure "zstd -dc | psql" restore "" -- \
        sh -c "zstd -q -dc '$WORK/pg.sql.zst' | psql -q -v ON_ERROR_STOP=1 '$url_r'"
    }
    for ssl in require disable; do
      engine="postgres (sslmode=$ssl)"
      url="postgres://spirekeep:$PW@127.0.0.1:5432/$DB?sslmode=$ssl"
      url_r="postgres://spirekeep:$PW@127.0.0.1:5432/${DB}_r?sslmode=$ssl"
      for round in $(seq 0 $((ROUNDS - 1))); do
        pair "$round" sk_backup native_backup
        pair "$round" sk_restore native_restore
      done
    done
    engine=postgres
    psql -q "$admin" -c "DROP DATABASE $DB" -c "DROP DATABASE ${DB}_r"
    ;;
  mysql)
    my=(mariadb -h127.0.0.1 -uspirekeep "-p$PW")
    "${my[@]}" -e "DROP DATABASE IF EXISTS $DB; CREATE DATABASE $DB; DROP DATABASE IF EXISTS ${DB}_r; CREATE DATABASE ${DB}_r"
    dsn="spirekeep:$PW@tcp(127.0.0.1:3306)/$DB?parseTime=true"
    "$GEN" --datastore "$dsn" --entries "$ENTRIES" >/dev/null
    fresh_r() { "${my[@]}" -e "DROP DATABASE ${DB}_r; CREATE DATABASE ${DB}_r"; }
    sk_backup() { rm -rf "$repo"; measure spirekeep backup "$repo" -- "$SK" backup --datastore "$dsn" --repo "$repo"; }
    native_backup() {
      measure "mysqldump --single-transaction | zstd -3 -T0" backup "$WORK/my.sql.zst" -- \
        sh -c "mysqldump -h127.0.0.1 -uspirekeep -p'$PW' --single-transaction $DB | zstd -q -3 -T0 -f -o '$WORK/my.sql.zst'"
    }
    sk_restore() {
      fresh_r
      measure spirekeep restore "" -- "$SK" restore latest --repo "$repo" \
        --datastore "spirekeep:$PW@tcp(127.0.0.1:3306)/${DB}_r?parseTime=true"
    }
    native_restore() {
      fresh_r
      measure "zstd -dc | mysql" restore "" -- sh -c "zstd -q -dc '$WORK/my.sql.zst' | mariadb -h127.0.0.1 -uspirekeep -p'$PW' ${DB}_r"
    }
    for round in $(seq 0 $((ROUNDS - 1))); do
      pair "$round" sk_backup native_backup
      pair "$round" sk_restore native_restore
    done
    "${my[@]}" -e "DROP DATABASE $DB; DROP DATABASE ${DB}_r"
    ;;
  *)
    echo "unknown engine $engine (sqlite, postgres, mysql)" >&2
    exit 2
    ;;
  esac
done

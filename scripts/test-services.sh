#!/usr/bin/env bash
# Installs (when missing) and starts everything the test suite talks to:
# PostgreSQL, MariaDB, an S3-compatible server (moto, from PyPI), and the
# sqlite3/zstd/pg_dump/mysqldump command-line tools. Safe to run repeatedly.
# Source it to get the environment the tests read:
#   source scripts/test-services.sh
# Everything listens on 127.0.0.1 only.
set -euo pipefail

SPIREKEEP_S3_PORT="${SPIREKEEP_S3_PORT:-9107}"
SPIREKEEP_S3_BUCKET="${SPIREKEEP_S3_BUCKET:-spirekeep-test}"
root_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
state_dir="$root_dir/target/test-services"
mkdir -p "$state_dir"

log() { echo "test-services: $*" >&2; }

need_apt=()
# The servers, not the clients: a machine may have psql without any PostgreSQL server.
pg_server_bin() { ls /usr/lib/postgresql/*/bin/postgres 2>/dev/null | sort -V | tail -n1; }
[ -n "$(pg_server_bin)" ] || need_apt+=(postgresql)
command -v pg_dump >/dev/null 2>&1 || need_apt+=(postgresql-client)
[ -x /usr/sbin/mariadbd ] || need_apt+=(mariadb-server)
command -v mariadb >/dev/null 2>&1 || need_apt+=(mariadb-client)
command -v sqlite3 >/dev/null 2>&1 || need_apt+=(sqlite3)
command -v zstd >/dev/null 2>&1 || need_apt+=(zstd)
command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)
command -v prometheus-pushgateway >/dev/null 2>&1 || need_apt+=(prometheus-pushgateway)
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
command -v python3 >/dev/null 2>&1 || need_apt+=(python3 python3-venv)
command -v make-ssl-cert >/dev/null 2>&1 || need_apt+=(ssl-cert)
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
if [ "${#need_apt[@]}" -gt 0 ]; then
  log "installing ${need_apt[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# --- PostgreSQL: a cluster (created when the package made none), started
pg_version="$(basename "$(dirname "$(dirname "$(pg_server_bin)")")")"
if ! pg_lsclusters -h 2>/dev/null | awk '{print $1" "$2}' | grep -q "^$pg_version main$"; then
  log "creating PostgreSQL $pg_version cluster main"
  pg_createcluster "$pg_version" main -p 5432 >/dev/null
fi
if ! pg_isready -h 127.0.0.1 -p 5432 -q; then
  log "starting PostgreSQL $pg_version"
  pg_ctlcluster --skip-systemctl-redirect "$pg_version" main start
  for _ in $(seq 120); do pg_isready -h 127.0.0.1 -p 5432 -q && break; sleep 0.5; done
  pg_isready -h 127.0.0.1 -p 5432 -q || { log "PostgreSQL did not start: see /var/log/postgresql/"; exit 1; }
fi
# The test password is distinctive so the tests can prove it never reaches any output.
SPIREKEEP_TEST_PASSWORD="${SPIREKEEP_TEST_PASSWORD:-sk-test-pw-7Hq2}"
su postgres -c "psql -qtAc \"SELECT 1 FROM pg_roles WHERE rolname='spirekeep'\"" | grep -q 1 ||
  su postgres -c "psql -qc \"CREATE ROLE spirekeep LOGIN CREATEDB\""
su postgres -c "psql -qc \"ALTER ROLE spirekeep PASSWORD '$SPIREKEEP_TEST_PASSWORD'\""

# A role whose password is really checked (127.0.0.1 may be "trust" for everyone
# else), so the tests can see a wrong password refused.
su postgres -c "psql -qtAc \"SELECT 1 FROM pg_roles WHERE rolname='spirekeep_auth'\"" | grep -q 1 ||
  su postgres -c "psql -qc \"SET password_encryption='scram-sha-256'; CREATE ROLE spirekeep_auth LOGIN PASSWORD 'right-password'\""
hba_file="$(su postgres -c "psql -qtAc 'SHOW hba_file'")"
if ! grep -q "spirekeep_auth" "$hba_file"; then
  sed -i "1i host all spirekeep_auth 127.0.0.1/32 scram-sha-256" "$hba_file"
  su postgres -c "psql -qtAc 'SELECT pg_reload_conf()'" >/dev/null
fi

# --- MariaDB (root has socket auth only on Debian: the tests use their own TCP user)
if ! mysqladmin -uroot ping >/dev/null 2>&1; then
  log "starting MariaDB"
  mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
  # A package install on a machine without systemd leaves a data directory but may not have run
  # mariadb-install-db; the system tables are what tells.
  if [ ! -d /var/lib/mysql/mysql ]; then
    mariadb-install-db --user=mysql --datadir=/var/lib/mysql --skip-test-db >/dev/null
  fi
  start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd -- --user=mysql
  for _ in $(seq 120); do mysqladmin -uroot ping >/dev/null 2>&1 && break; sleep 0.5; done
  mysqladmin -uroot ping >/dev/null 2>&1 || { log "MariaDB did not start: run /usr/sbin/mariadbd --user=mysql to see why"; exit 1; }
fi
mariadb -uroot -e "CREATE USER IF NOT EXISTS 'spirekeep'@'localhost' IDENTIFIED BY '$SPIREKEEP_TEST_PASSWORD';
  CREATE USER IF NOT EXISTS 'spirekeep'@'%' IDENTIFIED BY '$SPIREKEEP_TEST_PASSWORD';
  ALTER USER 'spirekeep'@'localhost' IDENTIFIED BY '$SPIREKEEP_TEST_PASSWORD';
  ALTER USER 'spirekeep'@'%' IDENTIFIED BY '$SPIREKEEP_TEST_PASSWORD';
  GRANT ALL PRIVILEGES ON *.* TO 'spirekeep'@'localhost' WITH GRANT OPTION;
  GRANT ALL PRIVILEGES ON *.* TO 'spirekeep'@'%' WITH GRANT OPTION;"

# --- S3 (moto server from PyPI, in a virtualenv of its own)
moto_bin="$(command -v moto_server || true)"
if [ -z "$moto_bin" ] || ! "$moto_bin" --help >/dev/null 2>&1; then
  # Outside the work tree, so a fresh clone on the same machine reuses it.
  venv="${XDG_CACHE_HOME:-$HOME/.cache}/spirekeep/moto-venv"
  if [ ! -x "$venv/bin/moto_server" ]; then
    log "installing moto[server] from PyPI (about 90 s)"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q 'moto[server]'
  fi
  moto_bin="$venv/bin/moto_server"
fi
if ! curl -s -o /dev/null "http://127.0.0.1:$SPIREKEEP_S3_PORT/"; then
  log "starting moto on 127.0.0.1:$SPIREKEEP_S3_PORT"
  (setsid "$moto_bin" -H 127.0.0.1 -p "$SPIREKEEP_S3_PORT" >"$state_dir/moto.log" 2>&1 &)
  for _ in $(seq 60); do curl -s -o /dev/null "http://127.0.0.1:$SPIREKEEP_S3_PORT/" && break; sleep 0.5; done
fi
curl -s -X PUT "http://127.0.0.1:$SPIREKEEP_S3_PORT/$SPIREKEEP_S3_BUCKET" >/dev/null

export SPIREKEEP_TEST_PASSWORD
export SPIREKEEP_TEST_PG_URL="postgres://spirekeep:$SPIREKEEP_TEST_PASSWORD@127.0.0.1:5432/postgres"
export SPIREKEEP_TEST_MYSQL_URL="mysql://spirekeep:$SPIREKEEP_TEST_PASSWORD@127.0.0.1:3306/"
export SPIREKEEP_TEST_MYSQL_SOCKET="$(mysqladmin -uroot variables 2>/dev/null | awk '$2=="socket"{print $4}')"
export SPIREKEEP_TEST_S3_ENDPOINT="http://127.0.0.1:$SPIREKEEP_S3_PORT"
export SPIREKEEP_TEST_S3_BUCKET="$SPIREKEEP_S3_BUCKET"
# moto accepts any credentials; giving them keeps object_store off the cloud metadata address.
export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_REGION=us-east-1
# Tests fail, rather than skip, when a service is missing.
export SPIREKEEP_TEST_REQUIRE_SERVICES=1
log "ready: PostgreSQL, MariaDB, S3 at $SPIREKEEP_TEST_S3_ENDPOINT"

# --- Cloud storage emulators for gs:// and az:// repositories (issue 15) ------
# fake-gcs-server (Go module, built with `go install`) and Azurite (npm), each
# installed once into a cache folder named after its version and reused, then
# started on 127.0.0.1. The tests get explicit endpoints and credentials
# (SPIREKEEP_TEST_GCS_*, SPIREKEEP_TEST_AZURE_*), so object_store never asks a
# cloud address. Set SPIREKEEP_SKIP_CLOUD_EMULATORS=1 to leave them out (the
# gs:// and az:// tests then fail under SPIREKEEP_TEST_REQUIRE_SERVICES=1).
if [ "${SPIREKEEP_SKIP_CLOUD_EMULATORS:-0}" != "1" ]; then
  emulator_cache="${XDG_CACHE_HOME:-$HOME/.cache}/spirekeep"
  FAKE_GCS_VERSION="${FAKE_GCS_VERSION:-v1.56.1}"
  AZURITE_VERSION="${AZURITE_VERSION:-3.35.0}"   # 3.36+ needs Node 21 or newer
  SPIREKEEP_GCS_PORT="${SPIREKEEP_GCS_PORT:-9108}"
  SPIREKEEP_AZURE_PORT="${SPIREKEEP_AZURE_PORT:-9109}"
  SPIREKEEP_GCS_BUCKET="${SPIREKEEP_GCS_BUCKET:-spirekeep-test}"
  SPIREKEEP_AZURE_CONTAINER="${SPIREKEEP_AZURE_CONTAINER:-spirekeep-test}"
  # Azurite's one account and its published key: a fixed emulator credential, not a secret.
  azurite_account=devstoreaccount1
  azurite_key='Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=='

  azurite_dir="$emulator_cache/azurite-$AZURITE_VERSION"
  if [ ! -x "$azurite_dir/node_modules/.bin/azurite-blob" ]; then
    command -v npm >/dev/null 2>&1 || { apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null; }
    log "installing azurite $AZURITE_VERSION from npm (once)"
    mkdir -p "$azurite_dir"
    npm install --silent --no-audit --no-fund --prefix "$azurite_dir" "azurite@$AZURITE_VERSION" >/dev/null
  fi

  # gs:// is opt-in (SPIREKEEP_TEST_GCS=1, see below): fake-gcs-server is built and started only then,
  # so a fresh machine does not spend minutes compiling what the default run does not use.
  if [ "${SPIREKEEP_TEST_GCS:-0}" = "1" ]; then
    fake_gcs_bin="$emulator_cache/fake-gcs-server-$FAKE_GCS_VERSION/bin/fake-gcs-server"
    if [ ! -x "$fake_gcs_bin" ]; then
      command -v go >/dev/null 2>&1 || { apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq golang-go >/dev/null; }
      log "building fake-gcs-server $FAKE_GCS_VERSION with go install (a few minutes, once)"
      GOBIN="$(dirname "$fake_gcs_bin")" go install "github.com/fsouza/fake-gcs-server@$FAKE_GCS_VERSION"
    fi
    if ! curl -s -o /dev/null "http://127.0.0.1:$SPIREKEEP_GCS_PORT/storage/v1/b"; then
      log "starting fake-gcs-server on 127.0.0.1:$SPIREKEEP_GCS_PORT"
      mkdir -p "$state_dir/fake-gcs"
      (setsid "$fake_gcs_bin" -scheme http -host 127.0.0.1 -port "$SPIREKEEP_GCS_PORT" \
        -public-host "127.0.0.1:$SPIREKEEP_GCS_PORT" -external-url "http://127.0.0.1:$SPIREKEEP_GCS_PORT" \
        -backend memory -log-level warn >"$state_dir/fake-gcs.log" 2>&1 &)
      for _ in $(seq 60); do curl -s -o /dev/null "http://127.0.0.1:$SPIREKEEP_GCS_PORT/storage/v1/b" && break; sleep 0.5; done
    fi
    curl -s -o /dev/null -X POST -H 'Content-Type: application/json' \
      --data "{\"name\":\"$SPIREKEEP_GCS_BUCKET\"}" "http://127.0.0.1:$SPIREKEEP_GCS_PORT/storage/v1/b"
    # object_store's GCS client reads its endpoint from a service-account file;
    # disable_oauth keeps it from asking Google for a token.
    gcs_account_file="$state_dir/fake-gcs-service-account.json"
    printf '{"gcs_base_url":"http://127.0.0.1:%s","disable_oauth":true,"client_email":"","private_key":"","private_key_id":""}\n' \
      "$SPIREKEEP_GCS_PORT" >"$gcs_account_file"
  fi

  # An Azurite started by another checkout keeps its blobs in that checkout; once the checkout is
  # deleted it still answers but stores nothing (every write times out). Restart such a one.
  for pid in $(pgrep -f "azurite-blob .*--blobPort $SPIREKEEP_AZURE_PORT" || true); do
    location="$( (tr '\0' '\n' <"/proc/$pid/cmdline" | sed -n '/^--location$/{n;p;}') 2>/dev/null || true)"
    if [ -n "$location" ] && [ ! -d "$location" ]; then
      log "restarting Azurite: its data directory $location is gone"
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 20); do curl -s -o /dev/null "http://127.0.0.1:$SPIREKEEP_AZURE_PORT/" || break; sleep 0.25; done
    fi
  done
  # --disableTelemetry: Azurite otherwise tries to send usage data off the machine.
  if ! curl -s -o /dev/null "http://127.0.0.1:$SPIREKEEP_AZURE_PORT/"; then
    log "starting Azurite (blob) on 127.0.0.1:$SPIREKEEP_AZURE_PORT"
    mkdir -p "$state_dir/azurite"
    (setsid "$azurite_dir/node_modules/.bin/azurite-blob" --blobHost 127.0.0.1 --blobPort "$SPIREKEEP_AZURE_PORT" \
      --location "$state_dir/azurite" --skipApiVersionCheck --loose --silent --disableTelemetry \
      >"$state_dir/azurite.log" 2>&1 &)
    for _ in $(seq 60); do curl -s -o /dev/null "http://127.0.0.1:$SPIREKEEP_AZURE_PORT/" && break; sleep 0.5; done
  fi
  # Create the container with a Shared Key request (object_store cannot create containers).
  azure_create_container() {
    local date version sts hexkey sig
    date="$(LC_ALL=C TZ=GMT date '+%a, %d %b %Y %H:%M:%S GMT')"
    version=2021-08-06
    sts="PUT"$'\n\n\n\n\n\n\n\n\n\n\n\n'"x-ms-date:$date"$'\n'"x-ms-version:$version"$'\n'"/$azurite_account/$azurite_account/$SPIREKEEP_AZURE_CONTAINER"$'\n'"restype:container"
    hexkey="$(printf '%s' "$azurite_key" | base64 -d | od -An -vtx1 | tr -d ' \n')"
    sig="$(printf '%s' "$sts" | openssl dgst -sha256 -mac HMAC -macopt "hexkey:$hexkey" -binary | base64)"
    curl -s -o /dev/null -w '%{http_code}' -X PUT -H "Content-Length: 0" -H "x-ms-date: $date" -H "x-ms-version: $version" \
      -H "Authorization: SharedKey $azurite_account:$sig" \
      "http://127.0.0.1:$SPIREKEEP_AZURE_PORT/$azurite_account/$SPIREKEEP_AZURE_CONTAINER?restype=container"
  }
  case "$(azure_create_container)" in
    201 | 409) ;; # created, or already there
    *) log "could not create the Azurite container $SPIREKEEP_AZURE_CONTAINER: see $state_dir/azurite.log" ;;
  esac

  # gs:// tests are opt-in (SPIREKEEP_TEST_GCS=1): fake-gcs-server answers the
  # XML-API uploads object_store sends with "400 invalid uploadType".
  if [ "${SPIREKEEP_TEST_GCS:-0}" = "1" ]; then
    export SPIREKEEP_TEST_GCS_ENDPOINT="http://127.0.0.1:$SPIREKEEP_GCS_PORT"
    export SPIREKEEP_TEST_GCS_BUCKET="$SPIREKEEP_GCS_BUCKET"
    export SPIREKEEP_TEST_GCS_SERVICE_ACCOUNT="$gcs_account_file"
  fi
  export SPIREKEEP_TEST_AZURE_ENDPOINT="http://127.0.0.1:$SPIREKEEP_AZURE_PORT/$azurite_account"
  export SPIREKEEP_TEST_AZURE_CONTAINER="$SPIREKEEP_AZURE_CONTAINER"
  export SPIREKEEP_TEST_AZURE_ACCOUNT="$azurite_account"
  export SPIREKEEP_TEST_AZURE_KEY="$azurite_key"
  # The fault tests start (and kill) a moto of their own on another port.
  export SPIREKEEP_TEST_MOTO_BIN="${moto_bin:-}"
  log "ready: fake-gcs-server at http://127.0.0.1:$SPIREKEEP_GCS_PORT, Azurite at $SPIREKEEP_TEST_AZURE_ENDPOINT"
fi

#!/usr/bin/env bash
# The README's test command: starts the services and runs every test against
# the real PostgreSQL, MariaDB and S3 server.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/test-services.sh
source scripts/test-services.sh
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --all-targets --no-fail-fast "$@"
  cargo test --doc
else
  cargo test --all-targets --no-fail-fast "$@"
fi

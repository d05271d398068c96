#!/usr/bin/env bash
# The README's test command: installs and starts the services (PostgreSQL,
# MariaDB, S3), builds a real SPIRE (cached by version), and runs every test
# against them. Works with or without cargo-nextest.
#
# The tests that drive real process fleets (the stand-in fleet, the staged
# upgrades and the real SPIRE server and agent) have health-gate timeouts; on
# a 2-core machine they starve each other when run side by side, so they run
# one at a time, in both runners.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/test-services.sh
source scripts/test-services.sh

# A real SPIRE (spire-server and spire-agent built from source). Under CI a
# failed build fails the run; elsewhere the SPIRE tests are skipped with a line
# that says how to enable them.
if spire_dir="$(scripts/spire.sh)"; then
  export SPIREKEEP_SPIRE_BIN_DIR="$spire_dir"
elif [ "${CI:-}" = "true" ]; then
  echo "test.sh: could not build SPIRE (scripts/spire.sh failed above)" >&2
  exit 1
else
  echo "test.sh: skipping the real-SPIRE tests: scripts/spire.sh could not build SPIRE (needs Go and a C compiler)" >&2
fi
if [ "${CI:-}" = "true" ]; then
  export SPIREKEEP_TEST_REQUIRE_SPIRE=1
fi

serial_targets=(upgrade_apply standin_fleet spire_e2e secret_scan kill_campaign)
# A short fuzzing pass over the committed corpus (every target, a few
# seconds each; cargo-fuzz is installed from crates.io when missing).
# FUZZ_SMOKE_SECONDS=0 skips it.
fuzz_smoke() {
  if [ "${FUZZ_SMOKE_SECONDS:-10}" != "0" ]; then
    FUZZ_SMOKE_SECONDS="${FUZZ_SMOKE_SECONDS:-10}" scripts/fuzz-smoke.sh
  fi
}
if cargo nextest --version >/dev/null 2>&1; then
  # .config/nextest.toml puts the serial targets in a test group of one thread.
  cargo nextest run --all-targets --no-fail-fast "$@"
  cargo test --doc
  fuzz_smoke
else
  parallel_args=(--lib --bins --examples)
  for f in tests/*.rs; do
    t="$(basename "$f" .rs)"
    case " ${serial_targets[*]} " in *" $t "*) ;; *) parallel_args+=(--test "$t") ;; esac
  done
  serial_args=()
  for t in "${serial_targets[@]}"; do serial_args+=(--test "$t"); done
  status=0
  cargo test --no-fail-fast "${parallel_args[@]}" "$@" || status=1
  cargo test --no-fail-fast "${serial_args[@]}" "$@" -- --test-threads=1 || status=1
  cargo test --doc || status=1
  fuzz_smoke || status=1
  exit "$status"
fi

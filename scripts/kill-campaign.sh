#!/usr/bin/env bash
# The kill -9 campaign (tests/kill_campaign.rs): backup, restore --replace
# (same engine and across engines) and apply on every engine, each killed
# with SIGKILL at random instants and at the pause points, then checked.
#   scripts/kill-campaign.sh [POINTS] [TEST_FILTER...]   (default 50 points per operation and engine)
# SPIREKEEP_KILL_SEED replays a run; SPIREKEEP_KILL_ENTRIES sizes the datastore
# (default 2000 entries). Starts the services like scripts/test.sh. The
# summary (one line per operation and engine) is printed at the end and
# written to target/kill-campaign/summary.txt, the whole log beside it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
points="${1:-50}"
shift || true
# shellcheck source=scripts/test-services.sh
source scripts/test-services.sh
export SPIREKEEP_TEST_REQUIRE_SERVICES=1 SPIREKEEP_KILL_POINTS="$points"
out=target/kill-campaign
mkdir -p "$out"
started=$(date +%s)
status=0
cargo test --test kill_campaign -- --nocapture --test-threads=1 "$@" >"$out/log.txt" 2>&1 || status=$?
{
  echo "kill campaign: $points points per operation and engine, $(date -u +%Y-%m-%dT%H:%M:%SZ), $(( $(date +%s) - started )) s"
  grep -E '^kill-campaign: |SPIREKEEP_KILL_SEED=|^test result:|panicked' "$out/log.txt" || true
} | tee "$out/summary.txt"
exit "$status"

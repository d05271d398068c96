#!/usr/bin/env bash
# A short fuzzing pass for CI: every target for ~20 s over the committed
# corpus; a crash fails the run. The corpus is not changed.
set -euo pipefail
exec "$(dirname "${BASH_SOURCE[0]}")/fuzz.sh" "${FUZZ_SMOKE_SECONDS:-20}"

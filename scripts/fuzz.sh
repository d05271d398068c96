#!/usr/bin/env bash
# Runs the cargo-fuzz targets in fuzz/ one after another.
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]     (default 600 s, every target)
# With FUZZ_MERGE=1 the new inputs are merged, minimized, into fuzz/corpus/<target>
# (the committed corpus); otherwise they go to a scratch folder that is thrown away.
# Each target's last libFuzzer line (runs, seconds) is appended to fuzz/scratch/runs.log.
# Only the stable toolchain is installed, so cargo-fuzz's nightly flags are
# unlocked with RUSTC_BOOTSTRAP=1. cargo-fuzz is installed from crates.io when missing.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root/fuzz"
seconds="${1:-600}"
shift || true
all_targets=(manifest_json snapshot_codec plan_toml server_conf_hcl dsn prometheus_text)
targets=("$@")
[ "${#targets[@]}" -gt 0 ] || targets=("${all_targets[@]}")
export RUSTC_BOOTSTRAP=1
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz 0.13.2 from crates.io" >&2
  cargo install --locked cargo-fuzz@0.13.2
fi
# No sanitizer: the crate forbids unsafe code, so ASan would only slow the
# search; debug assertions stay on so integer overflow is a crash.
build_flags=(--sanitizer none --debug-assertions)
cargo fuzz build "${build_flags[@]}" >&2
mkdir -p scratch
status=0
for target in "${targets[@]}"; do
  mkdir -p "corpus/$target" "seeds/$target"
  new="$(mktemp -d "scratch/$target.XXXXXX")"
  log="scratch/$target.log"
  echo "fuzz: $target for ${seconds}s" >&2
  start=$(date +%s)
  if ! cargo fuzz run "${build_flags[@]}" "$target" "$new" "corpus/$target" "seeds/$target" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1; then
    echo "fuzz: $target FAILED; the input is in fuzz/artifacts/$target/, the log in fuzz/$log" >&2
    tail -n 30 "$log" >&2
    status=1
  fi
  end=$(date +%s)
  runs="$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -n1)"
  echo "$(date -u +%FT%TZ) $target seconds=$((end - start)) executions=${runs:-?} exit=$status" | tee -a scratch/runs.log >&2
  if [ "${FUZZ_MERGE:-0}" = "1" ]; then
    merged="$(mktemp -d "scratch/$target.merged.XXXXXX")"
    cargo fuzz run "${build_flags[@]}" "$target" "$merged" "corpus/$target" "$new" -- -merge=1 >/dev/null 2>&1
    rm -rf "corpus/$target"
    mv "$merged" "corpus/$target"
  fi
  rm -rf "$new"
done
exit "$status"

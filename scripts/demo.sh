#!/usr/bin/env bash
# The README's first command: spirekeep on the bundled SPIRE datastore
# (examples/spire-datastore.sqlite3, schema 25, SPIRE 1.15.3). Works on a fresh
# machine with only Rust installed; writes nothing outside target/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cargo build --release --quiet
bin=target/release/spirekeep
work=target/demo
rm -rf "$work" && mkdir -p "$work"
# Work on a copy: the bundled file stays pristine.
cp examples/spire-datastore.sqlite3 "$work/datastore.sqlite3"

echo "== spirekeep inspect"
"$bin" inspect --datastore "$work/datastore.sqlite3"

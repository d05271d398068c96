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

repo="file://$PWD/$work/repo"
echo
echo "== spirekeep backup (consistent read, zstd, SHA-256, manifest written last)"
"$bin" backup --datastore "$work/datastore.sqlite3" --repo "$repo" --label demo
echo
echo "== spirekeep list"
"$bin" list --repo "$repo"
if "$bin" verify --help >/dev/null 2>&1; then
  echo
  echo "== spirekeep verify latest --deep (re-read every object, then a restore drill into a scratch SQLite file)"
  "$bin" verify latest --deep --repo "$repo"
fi
if "$bin" restore --help >/dev/null 2>&1; then
  echo
  echo "== spirekeep restore latest into a new SQLite datastore"
  "$bin" restore latest --repo "$repo" --datastore "$work/restored.sqlite3"
  echo
  echo "== spirekeep inspect (the restored datastore)"
  "$bin" inspect --datastore "$work/restored.sqlite3"
fi
echo
echo "Done. The repository is $work/repo; try: $bin show latest --repo $repo"

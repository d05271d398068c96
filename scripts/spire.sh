#!/usr/bin/env bash
# Builds spire-server and spire-agent from source with the Go toolchain, into
# a cache keyed by version, and prints the directory that holds them.
#   scripts/spire.sh            # v1.13.3
#   SPIRE_VERSION=v1.13.3 scripts/spire.sh
# A second run finds the cache and builds nothing. The cache lives under
# $SPIREKEEP_SPIRE_CACHE (default: ~/.cache/spirekeep/spire), outside the work
# tree, so a clean clone on the same machine reuses it.
#
# The Go module proxy refuses `go install …@v1.13.3` for SPIRE (its go.mod has
# replace directives), so the binaries are built inside a scratch module that
# requires SPIRE as a tool. cgo stays on: SPIRE's SQLite driver needs it.
# SPIRE's Makefile stamps release builds with the tag (version.gittag); without
# it a source build calls itself "1.13.3-dev-unk" and writes that into the
# datastore's migrations row. The same stamp makes these binaries behave, and
# write, exactly as the released ones do.
set -euo pipefail

version="${SPIRE_VERSION:-v1.13.3}"
cache_root="${SPIREKEEP_SPIRE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/spirekeep/spire}"
bin_dir="$cache_root/$version/bin"
log() { echo "spire.sh: $*" >&2; }

if [ -x "$bin_dir/spire-server" ] && [ -x "$bin_dir/spire-agent" ] &&
  [ "$("$bin_dir/spire-server" --version 2>&1 | head -n1)" = "${version#v}" ]; then
  echo "$bin_dir"
  exit 0
fi

command -v go >/dev/null 2>&1 || {
  log "Go is not installed: install Go 1.22 or newer to build SPIRE $version"
  exit 1
}
command -v cc >/dev/null 2>&1 || command -v gcc >/dev/null 2>&1 || {
  log "no C compiler: SPIRE's SQLite driver needs cgo (apt-get install gcc)"
  exit 1
}

work="$cache_root/$version/module"
mkdir -p "$work" "$bin_dir"
started=$(date +%s)
log "building spire-server and spire-agent $version (first time only; a few minutes)"
(
  cd "$work"
  [ -f go.mod ] || go mod init spirekeep.local/spire-build >/dev/null 2>&1
  export CGO_ENABLED=1 GOFLAGS="${GOFLAGS:-} -mod=mod"
  go get -tool "github.com/spiffe/spire/cmd/spire-server@$version" >&2
  go get -tool "github.com/spiffe/spire/cmd/spire-agent@$version" >&2
  GOBIN="$bin_dir" go install \
    -ldflags "-X github.com/spiffe/spire/pkg/common/version.gittag=${version#v}" \
    github.com/spiffe/spire/cmd/spire-server github.com/spiffe/spire/cmd/spire-agent >&2
)
log "built in $(($(date +%s) - started)) s: $("$bin_dir/spire-server" --version 2>&1 | head -n1)"
echo "$bin_dir"

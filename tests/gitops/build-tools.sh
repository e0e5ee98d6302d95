#!/usr/bin/env bash
# Builds (once) the Go helper tests/gitops.rs runs: gitops-check, which evaluates Argo CD health checks
# with gopher-lua (the Lua interpreter Argo CD embeds), computes kstatus (sigs.k8s.io/cli-utils) and
# evaluates Flux healthCheckExprs with Flux's own evaluator (github.com/fluxcd/pkg/runtime/cel).
# Prints the path of the binary. Idempotent: the module cache and the binaries live in
#   ${DELEGATION_CACHE:-~/.cache/delegation-operator}/gitops-tools-lua-<v>-kstatus-<v>-flux-<v>/
# (a version bump starts a new directory), one binary per hash of the helper's sources, so an edit
# rebuilds without downloading again and a warm cache builds nothing.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SRC=$HERE/checker
CACHE_ROOT=${DELEGATION_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/delegation-operator}

version_of() { awk -v m="$1" '$1 == m { print $2 }' "$SRC/go.mod"; }
hash=$(cat "$SRC/go.mod" "$SRC/go.sum" "$SRC"/*.go | sha256sum | cut -c1-12)
DIR=$CACHE_ROOT/gitops-tools-lua-$(version_of github.com/yuin/gopher-lua)-kstatus-$(version_of sigs.k8s.io/cli-utils)-flux-$(version_of github.com/fluxcd/pkg/runtime)
BIN=$DIR/bin/$hash/gitops-check

if [[ ! -x $BIN ]]; then
  mkdir -p "$(dirname "$BIN")"
  echo "[gitops-tools] building $BIN" >&2
  # go.sum pins every module; -mod=readonly refuses to change it. No go.work of the caller applies.
  (cd "$SRC" && GOWORK=off GOFLAGS=-mod=readonly GOMODCACHE=$DIR/gomod CGO_ENABLED=0 \
    go build -trimpath -o "$BIN.tmp.$$" .)
  mv -f "$BIN.tmp.$$" "$BIN"
fi
echo "$BIN"

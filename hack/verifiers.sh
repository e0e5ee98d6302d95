#!/usr/bin/env bash
# Independent JWT verifiers for the tests (tests/verifiers.rs): PyJWT, npm `jose` and go-jose, installed
# from their registries (PyPI, npm, the Go module proxy) into a cache keyed by their versions, so a rerun
# installs nothing. Prints the cache directory on stdout (the tests read it from $DELEGATION_VERIFIERS_DIR,
# or run this script themselves):
#
#   <dir>/venv/bin/python tests/verifiers/python/verify.py ...   PyJWT + cryptography in a venv
#   JOSE_DIR=<dir>/node node tests/verifiers/node/verify.mjs ... jose from <dir>/node/node_modules
#   <dir>/bin/go-verifier ...                                     tests/verifiers/go built with go-jose
#
# The programs themselves live in tests/verifiers/; the Go one is rebuilt when its sources change.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

PYJWT_VERSION=2.15.1
CRYPTOGRAPHY_VERSION=50.0.2
JOSE_VERSION=6.2.18
# go-jose's version is the one in tests/verifiers/go/go.mod (and go.sum); it names the cache too.
GO_JOSE_VERSION=$(awk '{ for (i = 1; i < NF; i++) if ($i == "github.com/go-jose/go-jose/v4") print $(i + 1) }' "$ROOT/tests/verifiers/go/go.mod")

CACHE_ROOT=${DELEGATION_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/delegation-operator}
DIR=$CACHE_ROOT/verifiers-pyjwt-$PYJWT_VERSION-cryptography-$CRYPTOGRAPHY_VERSION-jose-$JOSE_VERSION-go-jose-$GO_JOSE_VERSION

log() { printf '[verifiers] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

[[ -n $GO_JOSE_VERSION ]] || die "no go-jose version in tests/verifiers/go/go.mod"

mkdir -p "$DIR"
# One installer at a time per cache directory (parallel test binaries may all call this script).
exec 9>"$DIR/.lock"
flock 9

python_verifier() {
  local marker=$DIR/venv/.installed
  [[ -f $marker ]] && return
  command -v python3 >/dev/null || die "python3 is not installed"
  log "installing PyJWT $PYJWT_VERSION and cryptography $CRYPTOGRAPHY_VERSION into $DIR/venv"
  rm -rf "$DIR/venv"
  python3 -m venv "$DIR/venv" >&2 || die "python3 -m venv failed (on Debian: apt-get install python3-venv)"
  "$DIR/venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    "pyjwt==$PYJWT_VERSION" "cryptography==$CRYPTOGRAPHY_VERSION" >&2
  "$DIR/venv/bin/python" -c "import jwt; assert jwt.__version__ == '$PYJWT_VERSION', jwt.__version__"
  touch "$marker"
}

node_verifier() {
  local marker=$DIR/node/.installed
  [[ -f $marker ]] && return
  command -v node >/dev/null && command -v npm >/dev/null || die "node and npm are not installed"
  log "installing jose $JOSE_VERSION into $DIR/node"
  rm -rf "$DIR/node"
  mkdir -p "$DIR/node"
  printf '{"name": "delegation-operator-verifiers", "private": true}\n' >"$DIR/node/package.json"
  (cd "$DIR/node" && npm install --silent --no-audit --no-fund --save-exact "jose@$JOSE_VERSION" >&2)
  [[ -f $DIR/node/node_modules/jose/package.json ]] || die "npm did not install jose"
  touch "$marker"
}

go_verifier() {
  local src=$ROOT/tests/verifiers/go hash
  hash=$(cat "$src/go.mod" "$src/go.sum" "$src"/*.go | sha256sum | cut -c1-16)
  if [[ -x $DIR/bin/go-verifier && "$(cat "$DIR/bin/go-verifier.source" 2>/dev/null)" == "$hash" ]]; then
    return
  fi
  command -v go >/dev/null || die "go is not installed"
  log "building the go-jose $GO_JOSE_VERSION verifier into $DIR/bin"
  mkdir -p "$DIR/bin"
  (cd "$src" && GOWORK=off GOFLAGS=-mod=readonly CGO_ENABLED=0 go build -trimpath -o "$DIR/bin/go-verifier" .)
  echo "$hash" >"$DIR/bin/go-verifier.source"
}

python_verifier
node_verifier
go_verifier
echo "$DIR"

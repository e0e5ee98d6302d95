#!/usr/bin/env bash
# Builds delegation-operator as one statically linked executable: the Dockerfile's build stage runs
# exactly this script, so the test command can check the image's build step without a container engine.
#
#   hack/static-build.sh [--debug] [--out FILE] [--check [KUBECONFIG]]
#
#   --debug   a debug build (faster; the image uses the release build)
#   --out     copy the executable to FILE
#   --check   prove the result: statically linked (no ELF interpreter, no shared libraries), runs
#             `--version` and `crds`; with a KUBECONFIG also reaches that apiserver by host name, run
#             as root inside an empty chroot (no libc, no NSS modules, no shell), as in the image
#
# glibc's static libc with `-C target-feature=+crt-static` on x86_64-unknown-linux-gnu: the target must
# be named so that build scripts and proc macros stay dynamic host programs. glibc >= 2.34 has its
# `files` and `dns` NSS services inside libc itself, so name resolution needs no libnss_*.so at run
# time (checked by --check). The cargo target dir lives under the cache, apart from ./target.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE_ROOT=${DELEGATION_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/delegation-operator}
TARGET=x86_64-unknown-linux-gnu
export CARGO_TARGET_DIR=${STATIC_TARGET_DIR:-$CACHE_ROOT/static-build/target}

profile=release out="" check=false check_kubeconfig=""
while (($#)); do
  case $1 in
    --debug) profile=debug ;;
    --release) profile=release ;;
    --out) out=$2; shift ;;
    --check)
      check=true
      if [[ ${2:-} != "" && ${2:-} != --* ]]; then check_kubeconfig=$2; shift; fi ;;
    *) echo "usage: $0 [--debug] [--out FILE] [--check [KUBECONFIG]]" >&2; exit 2 ;;
  esac
  shift
done

log() { printf '[static-build] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

cargo_profile=()
[[ $profile == release ]] && cargo_profile=(--release)
log "cargo build ${cargo_profile[*]} --locked --target $TARGET (crt-static) into $CARGO_TARGET_DIR"
start=$SECONDS
(cd "$ROOT" && RUSTFLAGS='-C target-feature=+crt-static' \
  cargo build "${cargo_profile[@]}" --locked --target "$TARGET" --bin delegation-operator)
bin=$CARGO_TARGET_DIR/$TARGET/$profile/delegation-operator
log "built $bin in $((SECONDS - start)) s ($(du -h "$bin" | cut -f1))"

if [[ -n $out ]]; then
  mkdir -p "$(dirname "$out")"
  cp "$bin" "$out"
  bin=$out
fi

if ! $check; then
  echo "$bin"
  exit 0
fi

# --- checks ---------------------------------------------------------------------------------------
# No program interpreter and no DT_NEEDED entries: nothing for the loader to find at run time.
headers=$(readelf --program-headers --dynamic "$bin")
grep -q 'INTERP' <<<"$headers" && die "$bin has an ELF interpreter (dynamically linked)"
grep -q '(NEEDED)' <<<"$headers" && die "$bin needs shared libraries: $(grep '(NEEDED)' <<<"$headers")"
if command -v file >/dev/null; then
  file -b "$bin" | grep -Eq 'static(-pie)? linked|statically linked' || die "file(1): $(file -b "$bin")"
fi
if command -v ldd >/dev/null; then
  ldd_out=$(ldd "$bin" 2>&1 || true)
  grep -Eq 'not a dynamic executable|statically linked' <<<"$ldd_out" || die "ldd: $ldd_out"
fi
log "statically linked: $(command -v file >/dev/null && file -b "$bin" | cut -d, -f1-2)"

version=$("$bin" --version)
[[ $version == "delegation-operator "* ]] || die "--version printed: $version"
crds=$("$bin" crds)
[[ $(grep -c '^kind: CustomResourceDefinition' <<<"$crds") -ge 3 ]] || die "crds printed no CRDs"
log "runs: $version; crds prints $(grep -c '^kind: CustomResourceDefinition' <<<"$crds") CRDs"

if [[ -z $check_kubeconfig ]]; then
  echo "$bin"
  exit 0
fi

# Against a real apiserver, in an empty root: the executable, a kubeconfig naming the server by host
# name (so getaddrinfo runs), /etc/hosts and the nsswitch.conf distroless ships. `approve` of a grant
# that does not exist makes real API calls and must fail with the apiserver's NotFound, not with a
# connection or resolver error.
[[ $EUID -eq 0 ]] && command -v chroot >/dev/null || die "--check KUBECONFIG needs root and chroot(8)"
jail=$(mktemp -d)
trap 'rm -rf "$jail"' EXIT
mkdir -p "$jail/etc" "$jail/tmp"
cp "$bin" "$jail/delegation-operator"
printf '127.0.0.1\tlocalhost\n::1\tlocalhost\n' >"$jail/etc/hosts"
printf 'passwd: files\ngroup: files\nhosts: files dns\n' >"$jail/etc/nsswitch.conf"
# The serving certificate of the test control plane is for 127.0.0.1 and localhost.
sed -E 's#(server: https://)127\.0\.0\.1(:[0-9]+)#\1localhost\2#' "$check_kubeconfig" >"$jail/kubeconfig"
grep -q 'server: https://localhost:' "$jail/kubeconfig" || die "kubeconfig names no https://127.0.0.1:<port> server"
[[ -z $(find "$jail" -name '*.so*') ]] || die "the jail is not empty of libraries"
ask() { chroot "$jail" /delegation-operator approve "no-such-grant-$RANDOM" -n default --kubeconfig "$1" 2>&1 || true; }
answer=$(ask /kubeconfig)
grep -Eq 'DelegationGrant default/no-such-grant-[0-9]+ does not exist' <<<"$answer" ||
  die "in an empty root, the static binary did not get an answer from the apiserver: $answer"
# The control: a host name that resolves nowhere gets no such answer.
sed -E 's#(server: https://)localhost(:[0-9]+)#\1no-such-host.invalid\2#' "$jail/kubeconfig" >"$jail/unresolvable"
unresolved=$(ask /unresolvable)
grep -q 'does not exist' <<<"$unresolved" && die "an unresolvable server answered: $unresolved"
log "in an empty root it resolved localhost and asked the apiserver: $answer"
log "(and an unresolvable host name fails as it should: ${unresolved:0:160})"
echo "$bin"

#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit and property tests, and the integration tests against a
# real kube-apiserver built from Go modules (hack/control-plane.sh). Stops what it started.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n==> %s\n' "$*"; }

# A one-off build needs no incremental state (it only costs disk). Free space is printed because a full
# disk shows up much later as an obscure linker crash.
export CARGO_INCREMENTAL=${CARGO_INCREMENTAL:-0}
step "disk: $(df -h --output=avail . | tail -1 | tr -d ' ') free here"

step "cargo fmt --check"
cargo fmt --all -- --check
step "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets --locked -- -D warnings

# Whatever happens, stop what this script started: the demo's operator, and the control plane unless
# it was already running.
started_control_plane=
cleanup() {
  hack/demo.sh stop >/dev/null 2>&1 || true
  if [[ -n $started_control_plane ]]; then hack/control-plane.sh stop; fi
}
trap cleanup EXIT

step "control plane"
if hack/control-plane.sh status >/dev/null 2>&1 && [[ -f $(hack/control-plane.sh auth-config-path) ]]; then
  echo "reusing the running control plane (left running afterwards)"
else
  # Not running, or started by an older script without the authentication config the tests need.
  hack/control-plane.sh stop >/dev/null 2>&1 || true
  started_control_plane=yes
  hack/control-plane.sh start >/dev/null
fi
DELEGATION_TEST_KUBECONFIG=$(hack/control-plane.sh env | sed -n 's/^export KUBECONFIG=//p')
export DELEGATION_TEST_KUBECONFIG

# Tools the tests drive, each built or installed once into ~/.cache/delegation-operator, keyed by version.
step "helm $(sed -n 's/^HELM_VERSION=//p' hack/versions.env) and $(sed -n 's/^HELM3_VERSION=//p' hack/versions.env) (chart tests; built from their Go modules)"
HELM_BIN=$(hack/helm.sh)
HELM3_BIN=$(hack/helm.sh --helm3)
export HELM_BIN HELM3_BIN
step "independent verifiers (PyJWT, jose, go-jose)"
DELEGATION_VERIFIERS_DIR=$(hack/verifiers.sh)
export DELEGATION_VERIFIERS_DIR

step "cargo test"
cargo test --locked --all-targets

# The Dockerfile's build stage, as the image builds it (debug profile here: a cold release build takes
# too long for CI), then checks that the binary is static and talks to the apiserver with no libc around.
step "static build (the Dockerfile's build step) and its checks"
hack/static-build.sh --debug --check "$DELEGATION_TEST_KUBECONFIG" >/dev/null

# The README's first command, end to end on the same control plane: grants must turn into tokens. The
# stamping policy is removed first, so that the demo installs it anew as on a fresh cluster (grants
# created within seconds of a new policy are refused as unverified unless the demo waits).
step "make run (smoke test of the main job)"
(eval "$(hack/control-plane.sh env)" && kubectl delete --ignore-not-found \
  mutatingadmissionpolicy,mutatingadmissionpolicybinding delegation-operator-stamp-requester)
DELEGATION_DEMO_CLUSTER=local DELEGATION_DEMO_BIN="$PWD/target/debug/delegation-operator" hack/demo.sh
hack/demo.sh stop

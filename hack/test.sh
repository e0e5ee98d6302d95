#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit and property tests, and the integration tests against a
# real kube-apiserver built from Go modules (hack/control-plane.sh). Stops what it started.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n==> %s\n' "$*"; }

step "cargo fmt --check"
cargo fmt --all -- --check
step "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets --locked -- -D warnings

step "control plane"
if hack/control-plane.sh status >/dev/null 2>&1; then
  echo "reusing the running control plane (left running afterwards)"
else
  trap 'hack/control-plane.sh stop' EXIT
  hack/control-plane.sh start >/dev/null
fi
DELEGATION_TEST_KUBECONFIG=$(hack/control-plane.sh env | sed -n 's/^export KUBECONFIG=//p')
export DELEGATION_TEST_KUBECONFIG

step "cargo test"
cargo test --locked --all-targets

# The README's first command, end to end on the same control plane: grants must turn into tokens.
step "make run (smoke test of the main job)"
DELEGATION_DEMO_CLUSTER=local DELEGATION_DEMO_BIN="$PWD/target/debug/delegation-operator" hack/demo.sh
hack/demo.sh stop

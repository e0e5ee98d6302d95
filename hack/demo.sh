#!/usr/bin/env bash
# The operator's main job, end to end (`make run`):
#   - with a reachable cluster in your kubeconfig it uses that cluster; with none it builds (or reuses)
#     the local control plane from hack/control-plane.sh;
#   - installs the CRDs, starts the operator, applies the examples into namespace `delegation-demo`,
#     waits for every grant to be Ready, and shows both kinds and the decoded claims of one token.
# The cluster and the operator keep running; `make stop` (hack/demo.sh stop) stops what this started.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

STATE_DIR=${DELEGATION_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/delegation-operator}/demo
DEMO_NS=delegation-demo
OPERATOR_NS=delegation-system

say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

stop() {
  if [[ -f $STATE_DIR/operator.pid ]] && kill -0 "$(cat "$STATE_DIR/operator.pid")" 2>/dev/null; then
    kill "$(cat "$STATE_DIR/operator.pid")" && echo "operator stopped"
  fi
  rm -f "$STATE_DIR/operator.pid"
  if [[ -f $STATE_DIR/local-control-plane ]]; then
    hack/control-plane.sh stop
    rm -f "$STATE_DIR/local-control-plane"
  fi
}

if [[ ${1:-} == stop ]]; then
  stop
  exit 0
fi

mkdir -p "$STATE_DIR"
# DELEGATION_DEMO_CLUSTER=local forces the local control plane (the test suite runs this script so).
if [[ ${DELEGATION_DEMO_CLUSTER:-} != local ]] && [[ -n ${KUBECONFIG:-} || -f $HOME/.kube/config ]] &&
  kubectl version --request-timeout=5s >/dev/null 2>&1; then
  say "using the cluster of your kubeconfig ($(kubectl config current-context))"
  KUBECTL=(kubectl)
  KUBECONFIG_FLAG=()
else
  if hack/control-plane.sh status >/dev/null 2>&1; then
    say "no cluster configured: using the local control plane that is already running"
  else
    say "no cluster configured: starting the local control plane (etcd + kube-apiserver built from Go modules)"
    touch "$STATE_DIR/local-control-plane" # only what this script started is stopped by `hack/demo.sh stop`
  fi
  kubeconfig=$(hack/control-plane.sh start)
  eval "$(hack/control-plane.sh env)"
  KUBECTL=(kubectl --kubeconfig "$kubeconfig")
  KUBECONFIG_FLAG=(--kubeconfig "$kubeconfig")
fi

# DELEGATION_DEMO_BIN names an operator binary already built (the test suite passes its own).
if [[ -n ${DELEGATION_DEMO_BIN:-} ]]; then
  BIN=$DELEGATION_DEMO_BIN
else
  say "building the operator (release)"
  cargo build --release --quiet
  BIN=$ROOT/target/release/delegation-operator
fi

say "installing the CRDs and namespaces"
"$BIN" crds | "${KUBECTL[@]}" apply --server-side --field-manager delegation-operator-demo -f -
"${KUBECTL[@]}" wait --for=condition=Established crd/delegationgrants.delegation.nhi.dev crd/agentidentities.delegation.nhi.dev --timeout=60s
for ns in "$OPERATOR_NS" "$DEMO_NS"; do
  "${KUBECTL[@]}" get namespace "$ns" >/dev/null 2>&1 || "${KUBECTL[@]}" create namespace "$ns"
done

say "starting the operator (logs: $STATE_DIR/operator.log, audit trail: $STATE_DIR/audit.jsonl)"
if [[ -f $STATE_DIR/operator.pid ]] && kill -0 "$(cat "$STATE_DIR/operator.pid")" 2>/dev/null; then
  kill "$(cat "$STATE_DIR/operator.pid")"
  sleep 1
fi
"$BIN" run "${KUBECONFIG_FLAG[@]}" --operator-namespace "$OPERATOR_NS" \
  --issuer https://delegation-operator.delegation-system.svc \
  >>"$STATE_DIR/audit.jsonl" 2>>"$STATE_DIR/operator.log" </dev/null &
echo $! >"$STATE_DIR/operator.pid"

say "applying examples/ into namespace $DEMO_NS"
"${KUBECTL[@]}" apply -n "$DEMO_NS" -f examples/

say "waiting for every grant to be Ready"
"${KUBECTL[@]}" wait -n "$DEMO_NS" --for=condition=Ready delegationgrants --all --timeout=90s

say "kubectl get agentidentities,delegationgrants -n $DEMO_NS"
"${KUBECTL[@]}" get agentidentities,delegationgrants -n "$DEMO_NS"

say "the delegation chain of orchestrator-to-summarizer (status.chain)"
"${KUBECTL[@]}" get delegationgrant orchestrator-to-summarizer -n "$DEMO_NS" -o jsonpath='{range .status.chain[*]}{.kind}{"\t"}{.name}{"\t"}{.scopes}{"\n"}{end}'

say "decoded claims of the token in Secret orchestrator-to-summarizer-token (header and payload; the signature is not shown)"
"${KUBECTL[@]}" get secret orchestrator-to-summarizer-token -n "$DEMO_NS" -o jsonpath='{.data.token}' |
  python3 -c '
import base64, json, sys
token = base64.b64decode(sys.stdin.read()).decode()
for part in token.split(".")[:2]:
    print(json.dumps(json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))), indent=2))
'

say "published verification keys: ConfigMap $OPERATOR_NS/delegation-operator-jwks"
"${KUBECTL[@]}" get configmap delegation-operator-jwks -n "$OPERATOR_NS" -o jsonpath='{.data.jwks\.json}' | head -c 400
echo

cat <<EOF

The operator keeps running (PID $(cat "$STATE_DIR/operator.pid")) and rotates these tokens before they expire.
Try:  ${KUBECTL[*]} patch agentidentity support-orchestrator -n $DEMO_NS --type merge -p '{"spec":{"suspended":true}}'
      ${KUBECTL[*]} get delegationgrants -n $DEMO_NS -w
Stop everything this started with:  make stop
EOF

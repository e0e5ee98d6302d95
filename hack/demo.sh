#!/usr/bin/env bash
# The operator's main job, end to end (`make run`):
#   - with a reachable cluster in your kubeconfig it uses that cluster; with none it builds (or reuses)
#     the local control plane from hack/control-plane.sh;
#   - installs the CRDs and the admission policies, starts the operator, applies the examples into
#     namespace `delegation-demo`, waits for the grants to be Ready, approves the one that needs a
#     person's approval (as a second user, by impersonation), and shows both kinds, the chain with who
#     requested and approved each hop, and the decoded claims of one token.
# The cluster and the operator keep running; `make stop` (hack/demo.sh stop) stops what this started.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

STATE_DIR=${DELEGATION_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/delegation-operator}/demo
DEMO_NS=delegation-demo
OPERATOR_NS=delegation-system

say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

# Waits (at most 60 s) until the apiserver authorises USER to do VERB on RESOURCE in the demo namespace.
wait_authorised() {
  local user=$1 verb=$2 resource=$3
  for _ in $(seq 300); do
    [[ $("${KUBECTL[@]}" auth can-i "$verb" "$resource" -n "$DEMO_NS" --as "$user" 2>/dev/null) == yes ]] && return 0
    sleep 0.2
  done
  echo "the apiserver still does not let $user $verb $resource after 60 s" >&2
  return 1
}

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

say "installing the admission policies (the apiserver stamps who creates each grant)"
"$BIN" admission-policies | "${KUBECTL[@]}" apply --server-side --force-conflicts --field-manager delegation-operator-demo -f -
# A policy on a CRD applies once the apiserver has loaded the CRD's schema and the policy: probe with a
# server-side dry run until the requester comes back stamped.
probe='{"apiVersion":"delegation.nhi.dev/v1alpha1","kind":"DelegationGrant","metadata":{"name":"policy-probe"},
  "spec":{"principal":{"kind":"User","name":"probe@example.com"},"actorRef":{"name":"probe"},"scopes":["probe"],
  "audience":"https://probe.example.com","tokenTTL":"1m","requester":{"username":"forged"}}}'
for _ in $(seq 120); do
  stamped=$("${KUBECTL[@]}" create --dry-run=server -n "$DEMO_NS" -o jsonpath='{.spec.requester.username}' -f - <<<"$probe" 2>/dev/null || true)
  [[ -n $stamped && $stamped != forged ]] && break
  sleep 0.5
done
[[ -n ${stamped:-} && $stamped != forged ]] || { echo "the admission policies did not take effect" >&2; exit 1; }
echo "requesters are stamped (this kubeconfig is $stamped)"
# The operator trusts a stamp only on grants created STAMP_SETTLE (10 s, src/delegation/authority.rs)
# after the stamping and checking policies and their bindings exist (all applied together above): every apiserver must have loaded them. On a fresh
# cluster the probe above succeeds sooner, so wait out the rest before any grant is created.
created=$("${KUBECTL[@]}" get mutatingadmissionpolicy,mutatingadmissionpolicybinding delegation-operator-stamp-requester \
  -o jsonpath='{range .items[*]}{.metadata.creationTimestamp}{"\n"}{end}' | sort | tail -1)
wait_s=$(( $(date -d "$created" +%s) + 10 + 1 - $(date +%s) ))
if (( wait_s > 0 )); then
  echo "waiting ${wait_s} s: the operator trusts stamps from 10 s after the policy was created"
  sleep "$wait_s"
fi

say "starting the operator (logs: $STATE_DIR/operator.log, audit trail: $STATE_DIR/audit.jsonl)"
if [[ -f $STATE_DIR/operator.pid ]] && kill -0 "$(cat "$STATE_DIR/operator.pid")" 2>/dev/null; then
  kill "$(cat "$STATE_DIR/operator.pid")"
  sleep 1
fi
"$BIN" run "${KUBECONFIG_FLAG[@]}" --operator-namespace "$OPERATOR_NS" \
  --issuer https://delegation-operator.delegation-system.svc \
  --https-address 127.0.0.1:8443 --tls-self-signed=true \
  >>"$STATE_DIR/audit.jsonl" 2>>"$STATE_DIR/operator.log" </dev/null &
echo $! >"$STATE_DIR/operator.pid"

# Grants left by an earlier run may predate the stamping policies now in force (a reused cluster whose
# policies were re-created), which the operator rightly refuses: start the show from fresh grants.
if [[ -n $("${KUBECTL[@]}" get delegationgrants -n "$DEMO_NS" -o name 2>/dev/null) ]]; then
  say "deleting the grants of an earlier run (the operator revokes their tokens)"
  "${KUBECTL[@]}" delete delegationgrants --all -n "$DEMO_NS" --wait=true --timeout=90s
fi

say "declaring the APIs the examples use (AudiencePolicy, cluster-wide: no token for an undeclared audience)"
"${KUBECTL[@]}" apply -f examples/policies/

say "applying examples/ into namespace $DEMO_NS"
"${KUBECTL[@]}" apply -n "$DEMO_NS" -f examples/

say "waiting for the grants to be Ready (alice-payment-run waits for an approval)"
"${KUBECTL[@]}" wait -n "$DEMO_NS" --for=condition=Ready --timeout=90s \
  delegationgrant/alice-support-session delegationgrant/orchestrator-to-summarizer \
  delegationgrant/case-98765-read delegationgrant/alice-ticket-1234
"${KUBECTL[@]}" wait -n "$DEMO_NS" --for=jsonpath='{.status.conditions[0].reason}'=ApprovalPending \
  delegationgrant/alice-payment-run --timeout=60s
"${KUBECTL[@]}" get delegationgrant alice-payment-run -n "$DEMO_NS" -o jsonpath='{.status.conditions[0].message}{"\n"}'

say "carol@example.com approves it (she may approve that grant; a requester may not approve their own)"
"${KUBECTL[@]}" apply --server-side --field-manager delegation-operator-demo -n "$DEMO_NS" -f - <<'EOF'
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: payment-approvers}
rules:
- apiGroups: [delegation.nhi.dev]
  resources: [delegationgrants]
  resourceNames: [alice-payment-run]
  verbs: [get, approve]
- apiGroups: [delegation.nhi.dev]
  resources: [delegationapprovals]
  verbs: [create]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: payment-approvers}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: payment-approvers}
subjects:
- {apiGroup: rbac.authorization.k8s.io, kind: User, name: carol@example.com}
EOF
# A new RoleBinding reaches the apiserver's authorizer a moment after the write returns: wait until it
# authorises what carol is about to do (bounded; never a fixed sleep).
wait_authorised carol@example.com get delegationgrants.delegation.nhi.dev/alice-payment-run
wait_authorised carol@example.com approve delegationgrants.delegation.nhi.dev/alice-payment-run
wait_authorised carol@example.com create delegationapprovals.delegation.nhi.dev
"$BIN" approve alice-payment-run -n "$DEMO_NS" "${KUBECONFIG_FLAG[@]}" --as carol@example.com \
  --comment "invoice 2026-0042 checked"
"${KUBECTL[@]}" wait -n "$DEMO_NS" --for=condition=Ready delegationgrant/alice-payment-run --timeout=60s

say "kubectl get agentidentities,delegationgrants -n $DEMO_NS"
"${KUBECTL[@]}" get agentidentities,delegationgrants -n "$DEMO_NS"

say "the delegation chains (status.chain: kind, name, scopes, requested by, approved by)"
for grant in orchestrator-to-summarizer alice-payment-run; do
  echo "$grant:"
  "${KUBECTL[@]}" get delegationgrant "$grant" -n "$DEMO_NS" \
    -o jsonpath='{range .status.chain[*]}{"  "}{.kind}{"\t"}{.name}{"\t"}{.scopes}{"\t"}{.requestedBy}{"\t"}{.approvedBy}{"\n"}{end}'
done

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

#!/usr/bin/env bash
# Helm, built from its Go module (no release downloads), for the chart tests.
#
#   hack/helm.sh             build (or reuse) helm and print the path of the binary
#   hack/helm.sh path        print the path only (without building)
#   hack/helm.sh --helm3 [path]  the same for Helm 3 (HELM3_VERSION); $HELM3_BIN plays the part of $HELM_BIN
#   hack/helm.sh sync-chart  regenerate the chart's CRD and admission-policy templates from crds/ and
#                            admission/policies.yaml (tests/chart.rs fails when they drift)
#
# The version lives in hack/versions.env (HELM_VERSION). The binary is cached in
#   ${DELEGATION_CACHE:-~/.cache/delegation-operator}/helm-<version>/bin/helm
# so a rerun is instant and a version bump builds once next to the old one.
# When $HELM_BIN is set and executable it is used as is and nothing is built.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=versions.env
source "$ROOT/hack/versions.env"
: "${HELM_VERSION:?HELM_VERSION missing from hack/versions.env}"
if [[ ${1:-} == --helm3 ]]; then
  shift
  : "${HELM3_VERSION:?HELM3_VERSION missing from hack/versions.env}"
  HELM_VERSION=$HELM3_VERSION
  HELM_BIN=${HELM3_BIN:-}
fi

CACHE_ROOT=${DELEGATION_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/delegation-operator}
BUILD_DIR=$CACHE_ROOT/helm-$HELM_VERSION
HELM=$BUILD_DIR/bin/helm
MAJOR=${HELM_VERSION%%.*} # v4

log() { printf '[helm] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

CHART=$ROOT/charts/delegation-operator

# The CRDs and policies verbatim, with the chart's metadata added after each object's name (CRDs) or
# in place of its labels line (policies), behind the values that turn them on.
sync_chart() {
  local src out
  if grep -l '{{' "$ROOT"/crds/*.yaml "$ROOT/admission/policies.yaml"; then
    die "the files above contain '{{', which Helm would read as a template action; escape them in the generator"
  fi
  for src in "$ROOT"/crds/*.yaml; do
    out=$CHART/templates/crd-$(basename "$src")
    {
      echo '{{- /* Generated from crds/'"$(basename "$src")"' by `hack/helm.sh sync-chart`. Do not edit by hand. */ -}}'
      echo '{{- if .Values.crds.enabled }}'
      awk '
        { print }
        /^metadata:$/ { in_meta = 1; next }
        in_meta && /^  name: / {
          print "  {{- include \"delegation-operator.apiMetadata\" (dict \"context\" $ \"component\" \"crds\" \"keep\" $.Values.crds.keep) | nindent 2 }}"
          in_meta = 0
        }' "$src"
      echo '{{- end }}'
    } >"$out"
    log "wrote ${out#"$ROOT"/}"
  done
  out=$CHART/templates/admission-policies.yaml
  {
    echo '{{- /* Generated from admission/policies.yaml by `hack/helm.sh sync-chart`. Do not edit by hand. */ -}}'
    echo '{{- if .Values.admissionPolicies.enabled }}'
    # The finalizer policy is never kept (without an operator it would hold every new grant's
    # deletion) and is bound only to the watched namespace when there is one.
    awk '
      /^  name: / { name = $2 }
      /^  labels: \{app.kubernetes.io\/part-of: delegation-operator\}$/ {
        keep = (name == "delegation-operator-add-finalizer") ? "false" : "$.Values.admissionPolicies.keep"
        print "  {{- include \"delegation-operator.apiMetadata\" (dict \"context\" $ \"component\" \"admission\" \"keep\" " keep ") | nindent 2 }}"
        n++
        next
      }
      { print }
      /^  policyName: delegation-operator-add-finalizer$/ {
        print "  {{- with .Values.watchNamespace }}"
        print "  matchResources:"
        print "    matchPolicy: Equivalent"
        print "    objectSelector: {}"
        print "    namespaceSelector:"
        print "      matchLabels: {kubernetes.io/metadata.name: {{ . | quote }}}"
        print "  {{- end }}"
        scoped++
      }
      END {
        if (n == 0) { print "no labels line found" > "/dev/stderr"; exit 1 }
        if (scoped != 1) { print "no binding of the finalizer policy found" > "/dev/stderr"; exit 1 }
      }' "$ROOT/admission/policies.yaml"
    echo '{{- end }}'
  } >"$out"
  log "wrote ${out#"$ROOT"/}"
}

case ${1:-} in
  sync-chart) sync_chart; exit 0 ;;
  path | "") ;;
  *) die "unknown command $1 (build: no argument; path; sync-chart)" ;;
esac

if [[ ${1:-} == path ]]; then
  echo "${HELM_BIN:-$HELM}"
  exit 0
fi
if [[ -n "${HELM_BIN:-}" ]]; then
  [[ -x $HELM_BIN ]] || die "HELM_BIN=$HELM_BIN is not executable"
  echo "$HELM_BIN"
  exit 0
fi

# A binary is only reused when it reports the pinned version (a half-written file or another version
# is rebuilt).
if [[ -x $HELM ]] && "$HELM" version --template '{{.Version}}' 2>/dev/null | grep -qx "$HELM_VERSION"; then
  echo "$HELM"
  exit 0
fi

# The build must not pick up a go.work from the caller's directory. `go install pkg@version` builds the
# module with exactly its own go.mod (helm has no replace directives).
export GOWORK=off CGO_ENABLED=0
mkdir -p "$BUILD_DIR/bin"
# GOBIN cannot rename the output: build into a temporary directory, check, then move into place.
gobin=$(mktemp -d "$BUILD_DIR/gobin.XXXXXX")
trap 'rm -rf "$gobin"' EXIT
log "building helm $HELM_VERSION from helm.sh/helm/$MAJOR (cold: about 5 minutes on 2 cores)"
GOBIN=$gobin go install -trimpath \
  -ldflags "-s -w -X helm.sh/helm/$MAJOR/internal/version.version=$HELM_VERSION -X helm.sh/helm/$MAJOR/internal/version.gitTreeState=clean" \
  "helm.sh/helm/$MAJOR/cmd/helm@$HELM_VERSION"
got=$("$gobin/helm" version --template '{{.Version}}')
[[ $got == "$HELM_VERSION" ]] || die "built helm reports version $got, expected $HELM_VERSION"
mv -f "$gobin/helm" "$HELM"
log "helm $HELM_VERSION ready: $HELM"
echo "$HELM"

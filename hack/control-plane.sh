#!/usr/bin/env bash
# A real Kubernetes control plane (etcd + kube-apiserver, plus kubectl), built from Go modules and
# run on loopback. No Docker, no downloads from release sites: everything comes from the Go module proxy.
#
#   hack/control-plane.sh build    build (or reuse) the binaries in the versioned cache
#   hack/control-plane.sh start    build if needed, start etcd + kube-apiserver, print the kubeconfig path
#   hack/control-plane.sh stop     stop the processes this script started (recorded PIDs only)
#   hack/control-plane.sh restart  stop etcd and kube-apiserver and start them again with the same command
#                                  lines: same ports, etcd data, certificates and kubeconfig (for tests of
#                                  what survives a control-plane restart; never on a shared instance)
#   hack/control-plane.sh status   say whether it is running
#   hack/control-plane.sh env      print `export KUBECONFIG=...` and `export PATH=...` for a shell
#   hack/control-plane.sh auth-config-path
#                                  print the path of the apiserver's structured authentication config
#
# kube-apiserver runs with `--authentication-config <state dir>/authentication-config.yaml` (an
# apiserver.config.k8s.io/v1 AuthenticationConfiguration, next to the kubeconfig), written with no JWT
# authenticators at start. Tests add a JWT authenticator to it and restore it afterwards; the apiserver
# reloads the file about 10 s after a change.
#
# CONTROL_PLANE_DIR picks another state directory (ports are always free ones), so a second, private
# control plane can run beside the shared one: CONTROL_PLANE_DIR=/tmp/cp2 hack/control-plane.sh start
#
# Versions live in hack/versions.env. Binaries are cached in
#   ${DELEGATION_CACHE:-~/.cache/delegation-operator}/control-plane/k8s-<v>-etcd-<v>/
# When $KUBEBUILDER_ASSETS is set (the envtest convention) its etcd, kube-apiserver and kubectl are used
# instead and nothing is built.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=versions.env
source "$ROOT/hack/versions.env"

CACHE_ROOT=${DELEGATION_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/delegation-operator}
BUILD_DIR=$CACHE_ROOT/control-plane/k8s-$K8S_VERSION-etcd-$ETCD_VERSION
STATE_DIR=${CONTROL_PLANE_DIR:-$CACHE_ROOT/run}
if [[ -n "${KUBEBUILDER_ASSETS:-}" ]]; then BIN_DIR=$KUBEBUILDER_ASSETS; else BIN_DIR=$BUILD_DIR/bin; fi
KUBECONFIG_PATH=$STATE_DIR/kubeconfig
AUTH_CONFIG_PATH=$STATE_DIR/authentication-config.yaml

# The Go build must not pick up a go.work from the caller's directory.
export GOWORK=off GOFLAGS=${GOFLAGS:--mod=mod}

log() { printf '[control-plane] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# Prints a progress line every 100 packages of `go build -v` output, so a cold build visibly moves.
progress() {
  local what=$1
  awk -v what="$what" '{ n++; if (n % 100 == 0) { printf "[control-plane] %s: %d packages compiled\n", what, n; fflush() } }
                       END { printf "[control-plane] %s: %d packages compiled\n", what, n }' >&2
}

module_dir() { # module@version -> its directory in the module cache
  (cd /tmp && go mod download -json "$1") | python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])'
}

# kube-apiserver and kubectl. Upstream's go.mod requires its staging modules at v0.0.0 and replaces them
# with ./staging/...; a wrapper module replaces each with the published k8s.io/<name> v0.<minor>.<patch>.
build_kubernetes() {
  if [[ -x $BIN_DIR/kube-apiserver && -x $BIN_DIR/kubectl ]]; then return; fi
  local src=$CACHE_ROOT/src/kubernetes-$K8S_VERSION upstream staging_version minor
  upstream=$(module_dir "k8s.io/kubernetes@$K8S_VERSION")/go.mod
  staging_version=v0.${K8S_VERSION#v1.}
  minor=$(cut -d. -f2 <<<"$K8S_VERSION")
  mkdir -p "$src" "$BIN_DIR"
  {
    echo "module delegation-operator.local/control-plane/kubernetes"
    echo
    grep -E '^go [0-9]' "$upstream"
    # godebug may be a single line or a block; copy it as upstream has it.
    awk '/^godebug \(/{b=1} b{print} b&&/^\)/{b=0} /^godebug [^(]/{print}' "$upstream"
    echo
    echo "require k8s.io/kubernetes $K8S_VERSION"
    echo
    echo "replace ("
    sed -nE 's#^[[:space:]]*(k8s.io/[^[:space:]]+) => \./staging/src/k8s.io/.*#\t\1 => \1 '"$staging_version"'#p' "$upstream"
    echo ")"
  } >"$src/go.mod"
  log "kubernetes $K8S_VERSION: $(grep -c '=> k8s.io/' "$src/go.mod") staging modules replaced by $staging_version"
  cat >"$src/tools.go" <<'EOF'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
EOF
  log "resolving kubernetes $K8S_VERSION modules (go mod tidy)"
  (cd "$src" && go mod tidy)
  local ldflags="-s -w" pkg
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
  done
  log "building kube-apiserver and kubectl $K8S_VERSION (cold: many minutes on 2 cores)"
  (cd "$src" && CGO_ENABLED=0 go build -v -trimpath -ldflags "$ldflags" -o "$BIN_DIR/" \
    k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kubectl 2>&1) | progress "kubernetes"
  [[ -x $BIN_DIR/kube-apiserver && -x $BIN_DIR/kubectl ]] || die "kubernetes build produced no binaries"
}

# etcd: its go.mod replaces sibling modules with ../; as a dependency of a wrapper those replaces are
# ignored and the published versions it requires are used.
build_etcd() {
  if [[ -x $BIN_DIR/etcd ]]; then return; fi
  local src=$CACHE_ROOT/src/etcd-$ETCD_VERSION upstream
  upstream=$(module_dir "go.etcd.io/etcd/server/v3@$ETCD_VERSION")/go.mod
  mkdir -p "$src" "$BIN_DIR"
  {
    echo "module delegation-operator.local/control-plane/etcd"
    echo
    grep -E '^go [0-9]' "$upstream"
    echo
    echo "require go.etcd.io/etcd/server/v3 $ETCD_VERSION"
  } >"$src/go.mod"
  printf '//go:build tools\n\npackage tools\n\nimport _ "go.etcd.io/etcd/server/v3"\n' >"$src/tools.go"
  log "resolving etcd $ETCD_VERSION modules (go mod tidy)"
  (cd "$src" && go mod tidy)
  log "building etcd $ETCD_VERSION"
  (cd "$src" && CGO_ENABLED=0 go build -v -trimpath -ldflags "-s -w" -o "$BIN_DIR/etcd" \
    go.etcd.io/etcd/server/v3 2>&1) | progress "etcd"
  [[ -x $BIN_DIR/etcd ]] || die "etcd build produced no binary"
}

cmd_build() {
  if [[ -n "${KUBEBUILDER_ASSETS:-}" ]]; then
    local b
    for b in etcd kube-apiserver kubectl; do
      [[ -x $BIN_DIR/$b ]] || die "KUBEBUILDER_ASSETS is set but $BIN_DIR/$b is missing"
    done
    log "using binaries from KUBEBUILDER_ASSETS=$BIN_DIR"
    return
  fi
  command -v go >/dev/null || die "go is not installed"
  local start=$SECONDS
  build_etcd
  build_kubernetes
  log "binaries ready in $BIN_DIR ($((SECONDS - start))s)"
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

pid_alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

is_running() {
  pid_alive "$STATE_DIR/etcd.pid" && pid_alive "$STATE_DIR/kube-apiserver.pid" && [[ -f $KUBECONFIG_PATH ]] &&
    curl -fsS --max-time 2 --cacert "$STATE_DIR/pki/ca.crt" --cert "$STATE_DIR/pki/admin.crt" \
      --key "$STATE_DIR/pki/admin.key" "$(cat "$STATE_DIR/server-url")/readyz" >/dev/null 2>&1
}

make_certs() {
  local pki=$STATE_DIR/pki
  mkdir -p "$pki"
  (
    cd "$pki"
    openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 365 \
      -subj "/CN=delegation-operator-test-ca" 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -keyout serving.key -out serving.csr -subj "/CN=kube-apiserver" 2>/dev/null
    printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' >serving.ext
    openssl x509 -req -in serving.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out serving.crt -days 365 \
      -extfile serving.ext 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -keyout admin.key -out admin.csr -subj "/O=system:masters/CN=admin" 2>/dev/null
    printf 'extendedKeyUsage=clientAuth\n' >admin.ext
    openssl x509 -req -in admin.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out admin.crt -days 365 \
      -extfile admin.ext 2>/dev/null
    openssl genrsa -out sa.key 2048 2>/dev/null
    openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
    rm -f ./*.csr ./*.ext
  )
}

wait_for() { # description, seconds, command...
  local what=$1 timeout=$2
  shift 2
  local deadline=$((SECONDS + timeout))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || die "$what not ready after ${timeout}s (logs in $STATE_DIR)"
    sleep 0.3
  done
}

# The structured authentication configuration the apiserver starts with: no JWT authenticators (client
# certificates and ServiceAccount tokens keep working). Kept if it already exists.
write_auth_config() {
  [[ -f $AUTH_CONFIG_PATH ]] && return
  cat >"$AUTH_CONFIG_PATH" <<'EOF'
apiVersion: apiserver.config.k8s.io/v1
kind: AuthenticationConfiguration
jwt: []
EOF
}

write_kubeconfig() {
  local url=$1 pki=$STATE_DIR/pki
  cat >"$KUBECONFIG_PATH" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: local
  cluster:
    server: $url
    certificate-authority-data: $(base64 -w0 "$pki/ca.crt")
users:
- name: admin
  user:
    client-certificate-data: $(base64 -w0 "$pki/admin.crt")
    client-key-data: $(base64 -w0 "$pki/admin.key")
contexts:
- name: local
  context: {cluster: local, user: admin}
current-context: local
EOF
  chmod 600 "$KUBECONFIG_PATH"
}

cmd_start() {
  if is_running; then
    log "already running: $(cat "$STATE_DIR/server-url")"
    echo "$KUBECONFIG_PATH"
    return
  fi
  cmd_stop >/dev/null 2>&1 || true
  cmd_build
  rm -rf "$STATE_DIR"
  mkdir -p "$STATE_DIR"
  make_certs
  write_auth_config
  local etcd_port peer_port api_port pki=$STATE_DIR/pki
  etcd_port=$(free_port) peer_port=$(free_port) api_port=$(free_port)

  # setsid: the servers must not share the caller's process group, so a Ctrl-C in a test run does not
  # take them down half-way; `stop` ends them by recorded PID.
  setsid "$BIN_DIR/etcd" --name default --data-dir "$STATE_DIR/etcd-data" \
    --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
    --initial-cluster "default=http://127.0.0.1:$peer_port" --unsafe-no-fsync=true \
    </dev/null >"$STATE_DIR/etcd.log" 2>&1 &
  echo $! >"$STATE_DIR/etcd.pid"
  wait_for etcd 60 curl -fsS "http://127.0.0.1:$etcd_port/health"

  setsid "$BIN_DIR/kube-apiserver" --etcd-servers "http://127.0.0.1:$etcd_port" \
    --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$api_port" \
    --endpoint-reconciler-type none --cert-dir "$STATE_DIR/apiserver-certs" \
    --tls-cert-file "$pki/serving.crt" --tls-private-key-file "$pki/serving.key" \
    --client-ca-file "$pki/ca.crt" --authorization-mode RBAC \
    --service-cluster-ip-range 10.0.0.0/24 --allow-privileged=true \
    --disable-admission-plugins ServiceAccount \
    --service-account-issuer "https://127.0.0.1:$api_port/" \
    --service-account-key-file "$pki/sa.pub" --service-account-signing-key-file "$pki/sa.key" \
    --authentication-config "$AUTH_CONFIG_PATH" \
    </dev/null >"$STATE_DIR/kube-apiserver.log" 2>&1 &
  echo $! >"$STATE_DIR/kube-apiserver.pid"
  echo "https://127.0.0.1:$api_port" >"$STATE_DIR/server-url"
  write_kubeconfig "https://127.0.0.1:$api_port"
  wait_for kube-apiserver 120 curl -fsS --cacert "$pki/ca.crt" --cert "$pki/admin.crt" --key "$pki/admin.key" \
    "https://127.0.0.1:$api_port/readyz"
  wait_for "namespace default" 60 "$BIN_DIR/kubectl" --kubeconfig "$KUBECONFIG_PATH" get namespace default
  log "kube-apiserver ready at https://127.0.0.1:$api_port"
  log "kubeconfig: $KUBECONFIG_PATH (stop with: hack/control-plane.sh stop)"
  echo "$KUBECONFIG_PATH"
}

stop_pid() {
  local file=$1 pid i
  [[ -f $file ]] || return 0
  pid=$(cat "$file")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for i in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$file"
}

cmd_stop() {
  stop_pid "$STATE_DIR/kube-apiserver.pid"
  stop_pid "$STATE_DIR/etcd.pid"
  log "stopped"
}

# The value of `--flag value` in a NUL-separated command line file.
arg_of() {
  tr '\0' '\n' <"$1" | awk -v flag="$2" 'prev == flag { print; exit } { prev = $0 }'
}

# Relaunches a process from its saved command line (NUL-separated), appending to its log.
relaunch() {
  local name=$1 argv
  mapfile -d '' -t argv <"$STATE_DIR/$name.cmdline"
  setsid "${argv[@]}" </dev/null >>"$STATE_DIR/$name.log" 2>&1 &
  echo $! >"$STATE_DIR/$name.pid"
}

cmd_restart() {
  local name pki=$STATE_DIR/pki
  for name in etcd kube-apiserver; do
    pid_alive "$STATE_DIR/$name.pid" || die "$name is not running in $STATE_DIR (start it first)"
    cp "/proc/$(cat "$STATE_DIR/$name.pid")/cmdline" "$STATE_DIR/$name.cmdline"
  done
  cmd_stop >/dev/null 2>&1
  relaunch etcd
  wait_for etcd 60 curl -fsS "$(arg_of "$STATE_DIR/etcd.cmdline" --listen-client-urls)/health"
  relaunch kube-apiserver
  wait_for kube-apiserver 120 curl -fsS --cacert "$pki/ca.crt" --cert "$pki/admin.crt" --key "$pki/admin.key" \
    "$(cat "$STATE_DIR/server-url")/readyz"
  log "restarted: kube-apiserver ready at $(cat "$STATE_DIR/server-url")"
}

cmd_status() {
  if is_running; then
    echo "running: $(cat "$STATE_DIR/server-url") (KUBECONFIG=$KUBECONFIG_PATH)"
    if ! tr '\0' ' ' <"/proc/$(cat "$STATE_DIR/kube-apiserver.pid")/cmdline" 2>/dev/null | grep -q -- --authentication-config; then
      log "warning: this kube-apiserver was started without --authentication-config (an older version of this"
      log "script); tests/apiserver_trust.rs needs it: stop and start the control plane when nobody is using it"
    fi
  else
    echo "not running"
    return 1
  fi
}

cmd_env() {
  echo "export KUBECONFIG=$KUBECONFIG_PATH"
  echo "export PATH=$BIN_DIR:\$PATH"
}

case "${1:-}" in
  build) cmd_build ;;
  start) cmd_start ;;
  stop) cmd_stop ;;
  restart) cmd_restart ;;
  status) cmd_status ;;
  env) cmd_env ;;
  auth-config-path) echo "$AUTH_CONFIG_PATH" ;;
  *) echo "usage: $0 build|start|stop|restart|status|env|auth-config-path" >&2; exit 2 ;;
esac

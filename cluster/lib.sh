# Shared settings and helpers of the cluster scripts (sourced by each of them). Every setting can
# be overridden from the environment; the defaults are what `make cluster-up` uses.
# shellcheck disable=SC2034  # the settings are for the scripts that source this file

CLUSTER_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$CLUSTER_DIR")

# What is built: the k8s.io/kubernetes version pinned in go.mod, kwok for fake nodes, and
# kube-router, whose network policy controller alone enforces NetworkPolicies on the pod network.
K8S_VERSION=$(awk '$1 == "k8s.io/kubernetes" { print $2 }' "$CLUSTER_DIR/go.mod")
KWOK_VERSION=${CLUSTER_KWOK_VERSION:-v0.8.0}
KUBE_ROUTER_VERSION=${CLUSTER_KUBE_ROUTER_VERSION:-v2.1.0}
# Binaries live outside the clone, keyed by the version and a hash of what decides their contents.
CACHE_ROOT=${CLUSTER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/casaspawner/k8s}
BUILD_KEY=$(cd "$CLUSTER_DIR" && cat go.mod go.sum cmd/*/main.go | sha256sum | cut -c1-12)
BIN_DIR=$CACHE_ROOT/$K8S_VERSION-$BUILD_KEY/bin
KWOK_BIN=$CACHE_ROOT/kwok-$KWOK_VERSION/bin/kwok
KWOK_STAGES=$CACHE_ROOT/kwok-$KWOK_VERSION/bin/stages.yaml
KUBE_ROUTER_BIN=$CACHE_ROOT/kube-router-$KUBE_ROUTER_VERSION/bin/kube-router
# The Go toolchain: the machine's /usr/local/go when `go` is not on PATH.
PATH=$PATH:/usr/local/go/bin

# Where a running cluster keeps everything (gitignored): pki/, run/ (pid files, logs), containerd/,
# kubelet/, cni/, and the admin kubeconfig.
STATE=${CLUSTER_STATE:-$REPO/.cache/k8s}
RUN=$STATE/run
PKI=$STATE/pki
KUBECONFIG_OUT=$STATE/kubeconfig

# The network namespace every component runs in; only the API server is forwarded to the host.
NETNS=${CLUSTER_NETNS:-casaspawner-k8s}
NETNS_PATH=/run/netns/$NETNS
# The API server's port: the same number on 127.0.0.1 in the namespace and on the host, so one
# kubeconfig serves both.
API_PORT=${CLUSTER_API_PORT:-16443}
# The pod network inside the namespace: bridge cni0 holds NODE_IP, the node's address and the
# address pods reach the namespace (a hub started with cluster/exec) at.
POD_CIDR=10.244.0.0/16
NODE_IP=10.244.0.1
SERVICE_CIDR=10.96.0.0/16
# Pod addresses kwok gives pods on fake nodes (nothing answers there).
FAKE_POD_CIDR=10.245.0.0/16
NODE_NAME=casaspawner-node
# kubelet's cgroups (cgroupfs driver) sit under this parent in every hierarchy.
CGROUP_PARENT=casaspawner-k8s
# The sandbox ("pause") image, written by cluster/oci-image, never pulled.
PAUSE_IMAGE=localhost/casaspawner/pause:catatonit
# Fake nodes (kwok) to add at cluster-up; 0 starts no kwok.
FAKE_NODES=${CLUSTER_FAKE_NODES:-0}

# The one-line error every script ends with when something fails.
die() {
    [ -z "${STEP_OPEN:-}" ] || echo
    echo "error: $*" >&2
    exit 1
}

# Start a long-running command in its own session (so it outlives make), detached from the
# terminal: spawn PIDFILE LOG COMMAND... The pid written is the command's own (setsid, and nsenter
# without --fork, exec it in place).
spawn() {
    local pidfile=$1 log=$2
    shift 2
    # shellcheck disable=SC2016  # $$ and $@ are the inner shell's
    setsid bash -c 'echo $$ >"$0"; exec "$@"' "$pidfile" "$@" >"$log" 2>&1 </dev/null &
}

# Run a command inside the cluster's network namespace (and nothing else: same mounts, same files).
in_netns() {
    nsenter --net="$NETNS_PATH" -- "$@"
}

# Print a step; `step_done` prints how long it took.
step() {
    STEP_T0=$(date +%s%N)
    STEP_OPEN=1
    printf '%s ... ' "$*"
}
step_done() {
    local tenths=$((($(date +%s%N) - STEP_T0) / 100000000))
    STEP_OPEN=
    printf 'done (%d.%d s)\n' $((tenths / 10)) $((tenths % 10))
}

# Is process $1 running (a zombie, whose parent has not reaped it, is not)?
running() {
    local state
    state=$(awk '{ print $3 }' "/proc/$1/stat" 2>/dev/null) && [ -n "$state" ] && [ "$state" != Z ]
}

# Is the process of pid file $1 running?
alive() {
    local pid
    [ -f "$1" ] && pid=$(cat "$1") && [ -n "$pid" ] && running "$pid"
}

# Poll `$@` every 0.2 s until it succeeds; after $1 seconds print the tail of log $2 and fail with
# the sentence $3.
wait_for() {
    local timeout=$1 log=$2 what=$3
    shift 3
    local deadline=$((SECONDS + timeout))
    until "$@" >/dev/null 2>&1; do
        if [ $SECONDS -ge $deadline ]; then
            echo
            [ -f "$log" ] && tail -n 20 "$log" >&2
            die "$what (see $log)"
        fi
        sleep 0.2
    done
}

# curl against the API server as the admin, from inside the namespace.
api() {
    in_netns curl -sf --max-time 5 --cacert "$PKI/ca.crt" --cert "$PKI/admin.crt" \
        --key "$PKI/admin.key" "https://127.0.0.1:$API_PORT$1" "${@:2}"
}

# Send signal $1 to process group $2, or to process $2 when it leads no group.
signal() {
    kill -"$1" -- "-$2" 2>/dev/null || kill -"$1" "$2" 2>/dev/null || true
}

# SIGTERM the processes of the named pid files, each with its process group (cluster/up starts each
# in a session of its own: socat's per-connection children go too), wait up to GRACE seconds, then
# SIGKILL what is left: stop GRACE NAME...
stop() {
    local grace=$1 name pids=() pid
    shift
    for name in "$@"; do
        alive "$RUN/$name.pid" && pids+=("$(cat "$RUN/$name.pid")")
        rm -f "$RUN/$name.pid"
    done
    [ ${#pids[@]} -gt 0 ] || return 0
    for pid in "${pids[@]}"; do signal TERM "$pid"; done
    for _ in $(seq $((grace * 5))); do
        local left=0
        for pid in "${pids[@]}"; do running "$pid" && left=1; done
        [ $left -eq 1 ] || return 0
        sleep 0.2
    done
    for pid in "${pids[@]}"; do signal KILL "$pid"; done
    return 0
}

# Start the API server inside the namespace and wait until it is ready (cluster/up, and
# cluster/restart-apiserver with the same flags). --allow-privileged as on real clusters, so that
# PodSecurity is what refuses privileged pods.
start_apiserver() {
    spawn "$RUN/kube-apiserver.pid" "$RUN/kube-apiserver.log" \
        nsenter --net="$NETNS_PATH" -- "$BIN_DIR/kube-apiserver" \
        --etcd-servers=http://127.0.0.1:2379 \
        --bind-address=127.0.0.1 --secure-port="$API_PORT" --advertise-address="$NODE_IP" \
        --tls-cert-file="$PKI/apiserver.crt" --tls-private-key-file="$PKI/apiserver.key" \
        --client-ca-file="$PKI/ca.crt" \
        --kubelet-client-certificate="$PKI/apiserver-kubelet.crt" \
        --kubelet-client-key="$PKI/apiserver-kubelet.key" \
        --kubelet-certificate-authority="$PKI/ca.crt" \
        --kubelet-preferred-address-types=InternalIP \
        --service-account-issuer=https://kubernetes.default.svc.cluster.local \
        --service-account-key-file="$PKI/sa.pub" \
        --service-account-signing-key-file="$PKI/sa.key" \
        --service-cluster-ip-range="$SERVICE_CIDR" \
        --authorization-mode=Node,RBAC --enable-admission-plugins=NodeRestriction \
        --allow-privileged=true --profiling=false
    wait_for 60 "$RUN/kube-apiserver.log" "kube-apiserver was not ready in 60 s." api /readyz
}

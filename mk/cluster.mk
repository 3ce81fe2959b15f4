# A real single-node Kubernetes for the `k8s` test tier (cluster/, tests/k8s; cluster/README.md):
# kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kubectl and etcd built from their
# Go modules at the version cluster/go.mod pins (once per machine, cached in ~/.cache/casaspawner/k8s),
# Debian's containerd + runc and CNI plugins, all inside network namespace casaspawner-k8s; the API
# server is forwarded to 127.0.0.1 on the host. Needs root.
# Debian packages: the runtime and CNI plugins, the forwarder (socat), nsenter, openssl for the
# certificates, catatonit for the sandbox image; buildah and busybox-static make the tests' image.
APT_PACKAGES += containerd runc containernetworking-plugins socat iproute2 openssl curl util-linux \
	iptables catatonit buildah busybox-static

# Fake nodes (kwok) to add at cluster-up: `make cluster-up CLUSTER_FAKE_NODES=10`; 0 builds no kwok.
CLUSTER_FAKE_NODES ?= 0
export CLUSTER_FAKE_NODES

.PHONY: cluster-build cluster-up cluster-down cluster-test

# Build the binaries: about 9 min the first time on 2 cores, then cached (nothing to do).
cluster-build: deps
	cluster/build

# Start the cluster (about 10 s), or notice it is up already; admin kubeconfig: .cache/k8s/kubeconfig.
cluster-up: deps
	cluster/up

# Stop everything cluster-up started and remove its state (processes, mounts, namespace, cgroups).
cluster-down: deps
	cluster/down

# The k8s tier's harness tests (tests/k8s) on the cluster $KUBECONFIG points at, or else on this one
# (a running one is reused; one the tests started is stopped at the end unless CLUSTER_KEEP=1).
cluster-test: venv
	$(BIN)/pytest -m k8s tests/k8s $(PYTEST_ARGS)

# A real single-node Kubernetes for the `k8s` test tier (cluster/, tests/k8s; cluster/README.md):
# kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kubectl and etcd built from their
# Go modules at the version cluster/go.mod pins (once per machine, cached in ~/.cache/casaspawner/k8s),
# Debian's containerd + runc and CNI plugins, kube-router's NetworkPolicy controller (also built
# here), all inside network namespace casaspawner-k8s; the API server is forwarded to 127.0.0.1 on
# the host. Needs root.
# Debian packages: the runtime and CNI plugins, the forwarder (socat), nsenter, openssl for the
# certificates, catatonit for the sandbox image; buildah and busybox-static make the tests' image;
# docker-registry serves it to containerd when make bench-kube times a pull; kube-router, built
# like kwok, enforces NetworkPolicies with iptables and ipset.
APT_PACKAGES += containerd runc containernetworking-plugins socat iproute2 openssl curl util-linux \
	iptables ipset catatonit buildah busybox-static docker-registry

# Fake nodes (kwok) to add at cluster-up: `make cluster-up CLUSTER_FAKE_NODES=10`; 0 builds no kwok.
CLUSTER_FAKE_NODES ?= 0
export CLUSTER_FAKE_NODES

# The CASA image the k8s tier's end-to-end test runs (tests/k8s/test_browser.py): the same registry
# and release the images tier builds, so one build (cached in podman's storage) serves both.
K8S_REGISTRY ?= localhost/casaspawner
K8S_RELEASE ?= casa-6.6.5-31
# The other release whose apps the end-to-end test adds to a K8S_RELEASE desktop.
K8S_APP_RELEASE ?= casa-6.7.0-31

.PHONY: cluster-build cluster-up cluster-down cluster-test k8s-images k8s-test bench-kube

# Build the binaries: about 9 min (and 1.5 for kube-router) the first time on 2 cores, then cached.
cluster-build: deps
	cluster/build
	cluster/build kube-router

# Start the cluster (about 10 s), or notice it is up already; admin kubeconfig: .cache/k8s/kubeconfig.
cluster-up: deps
	cluster/up

# Stop everything cluster-up started and remove its state (processes, mounts, namespace, cgroups).
cluster-down: deps
	cluster/down

# The k8s tier (tests/k8s) on the cluster $KUBECONFIG points at, or else on this one (a running one
# is reused; one the tests started is stopped at the end unless CLUSTER_KEEP=1). Tests that need
# this repository's own cluster skip on someone else's.
cluster-test: venv chp
	$(BIN)/pytest tests/k8s $(PYTEST_ARGS)

# The session images of K8S_RELEASE and K8S_APP_RELEASE, built or reused (`casaspawner images
# build`, docs/images.md).
k8s-images: venv
	$(BIN)/casaspawner images build --base local --registry $(K8S_REGISTRY) \
		--release $(K8S_RELEASE) --release $(K8S_APP_RELEASE)

# The k8s tier on this machine's own cluster, as `make test` runs it: the cluster built and started
# (or reused when it is running already), every test run and none skipped (a skip fails), then the
# cluster stopped again if this target started it (CLUSTER_KEEP=1 keeps it), whatever the outcome.
# No hypothesis (the tier uses none): its plugin imports it at the end of the run, which hit
# CPython 3.11.7's "AST constructor recursion depth mismatch" here (see mk/kube.mk).
k8s-test: venv chp cluster-build k8s-images
	@keep=$${CLUSTER_KEEP:-0}; up=$$(cluster/up); echo "$$up"; \
	case "$$up" in *"already running"*) keep=1 ;; esac; \
	trap '[ "$$keep" = 1 ] || cluster/down' EXIT; \
	CASASPAWNER_K8S_NO_SKIP=1 KUBECONFIG=$(CURDIR)/.cache/k8s/kubeconfig \
		$(BIN)/pytest -p no:cacheprovider -p no:hypothesispytest tests/k8s $(PYTEST_ARGS)

# Spawn cost of CASASpawner beside a plain KubeSpawner on this cluster (benchmarks/kube_bench.py,
# about 33 min: results/kube-spawn.json), then a real hub keeping 1,000 sessions on kwok's fake
# nodes (kube_scale.py, about 10 min: results/kube-scale.json), both in the cluster's network
# namespace. The cluster is started (or reused) and stopped again if this target started it.
# BENCH_KUBE_ARGS and BENCH_SCALE_ARGS narrow them, e.g. `--levels 1 20 --settings fake` and
# `--sessions 100`.
bench-kube: venv chp cluster-build
	$(BIN)/python -m pip install --quiet -e ".[bench]"
	@keep=$${CLUSTER_KEEP:-0}; up=$$(CLUSTER_FAKE_NODES=1 cluster/up); echo "$$up"; \
	case "$$up" in *"already running"*) keep=1 ;; esac; \
	trap '[ "$$keep" = 1 ] || cluster/down' EXIT; \
	ip netns exec casaspawner-k8s $(BIN)/python benchmarks/kube_bench.py $(BENCH_KUBE_ARGS) && \
	ip netns exec casaspawner-k8s $(BIN)/python benchmarks/kube_scale.py $(BENCH_SCALE_ARGS)

# Image set: session + CASA images from the release catalog (images/, casaspawner/images/, tests/images/).
# Built with buildah on a local mmdebstrap Debian base (no registry pulls needed), run with podman.
APT_PACKAGES += podman buildah mmdebstrap runc uidmap slirp4netns fuse-overlayfs catatonit containers-storage \
	netavark aardvark-dns containernetworking-plugins iptables binutils

# What `make images` / `make bench-images` build: registry prefix, releases, extra `images build` flags.
IMAGES_REGISTRY ?= localhost/casaspawner
IMAGES_RELEASES ?= casa-6.6.5-31 casa-6.7.0-31
IMAGES_ARGS ?= --base local

.PHONY: images images-test bench-images

images: venv
	$(BIN)/casaspawner images build $(IMAGES_ARGS) --registry $(IMAGES_REGISTRY) \
		$(addprefix --release ,$(IMAGES_RELEASES))

images-test: venv
	$(BIN)/pytest -m images tests/images $(PYTEST_ARGS)

bench-images: images
	$(BIN)/python benchmarks/images_sizes.py --registry $(IMAGES_REGISTRY) $(IMAGES_RELEASES)

#!/bin/sh
# Shared build steps of the casaspawner recipes: sourced by RUN steps (as root, at build time only).
set -eu

# The build host's CA bundle, when the build tool passes one, is the build secret "casaspawner-ca": mounted
# only into the RUN steps that download (RUN --mount=type=secret,id=casaspawner-ca), never part of a layer.
# pip, Python and apt trust it then.
CASASPAWNER_CA=/run/secrets/casaspawner-ca
APT_CA=""
if [ -s "$CASASPAWNER_CA" ]; then
    export PIP_CERT="$CASASPAWNER_CA" SSL_CERT_FILE="$CASASPAWNER_CA" REQUESTS_CA_BUNDLE="$CASASPAWNER_CA"
    # apt's download methods run as _apt, which cannot read the root-only secret.
    APT_CA="-o Acquire::https::CAInfo=$CASASPAWNER_CA -o APT::Sandbox::User=root"
fi
export DEBIAN_FRONTEND=noninteractive

# apt_install PACKAGE...: install without recommends; the package lists stay out of the layer.
apt_install() {
    rm -f /etc/apt/apt.conf.d/docker-clean  # keeps the apt cache mount useful on Debian's own images
    # shellcheck disable=SC2086  # APT_CA is a list of options
    apt-get $APT_CA update -qq
    # shellcheck disable=SC2086
    apt-get $APT_CA install -y -qq --no-install-recommends "$@"
    rm -rf /var/lib/apt/lists/*
}

# pip_constraints FILE: "-c FILE" when FILE pins anything (casaspawner images constraints writes it).
pip_constraints() {
    if grep -q '==' "$1" 2>/dev/null; then echo "-c $1"; fi
}

# install_casa_runtime [PACKAGE...]: the libraries casatools and the extracted Qt GUIs (casaplotms, casaviewer)
# load, plus any extra packages.
install_casa_runtime() {
    apt_install \
        libgfortran5 libgomp1 libfontconfig1 libfreetype6 libglib2.0-0 libgl1 libegl1 libdbus-1-3 \
        libsm6 libice6 libxext6 libxrender1 libxi6 libxrandr2 libxfixes3 libxcursor1 libxinerama1 \
        libxkbcommon-x11-0 libxcb-cursor0 libxcb-icccm4 libxcb-image0 libxcb-keysyms1 libxcb-randr0 \
        libxcb-render-util0 libxcb-shape0 libxcb-xinerama0 libxcb-xkb1 libxslt1.1 "$@"
}

# extract_appimages DIR: replace every AppImage under DIR by its extracted tree (no FUSE in containers);
# the AppImage path becomes a link to the tree's AppRun, so callers that run the AppImage keep working.
extract_appimages() {
    find "$1" -type f -name '*.AppImage' | while IFS= read -r app; do
        dir=$(dirname "$app")
        base=$(basename "$app" .AppImage)
        chmod 0755 "$app"
        (cd "$dir" && "./$base.AppImage" --appimage-extract >/dev/null 2>&1) \
            || { echo "casaspawner: cannot extract $app" >&2; exit 1; }
        mv "$dir/squashfs-root" "$dir/$base.AppDir"
        rm -f "$app"
        ln -s "$base.AppDir/AppRun" "$app"
        echo "extracted $app"
    done
}

# appdirs DIR: the extracted AppImage trees under DIR.
appdirs() {
    find "$1" -type d -name '*.AppDir' -prune
}

# strip_symbols DIR...: drop debug sections and the symbol tables the dynamic loader does not use
# (--strip-unneeded, as Debian strips its libraries) from the ELF files under the given directories: the
# extracted casaplotms/casaviewer AppImages and casatools carry ~1.5 GB of debug data and ~60 MB of symbol
# tables. Only trees CASA builds itself are given: `strip` corrupts libraries edited by patchelf, as in other
# pip wheels (scipy's bundled OpenBLAS: "ELF load command address/offset not page-aligned"). As a guard, a
# stripped copy replaces its file only if the dynamic loader still accepts it.
strip_symbols() {
    find "$@" -type f -size +1M | while IFS= read -r f; do
        [ "$(head -c4 "$f" | tail -c3)" = ELF ] || continue
        strip --strip-unneeded -o "$f.stripped" "$f" 2>/dev/null || { rm -f "$f.stripped"; continue; }
        if ldd "$f.stripped" 2>&1 | grep -q 'page-aligned'; then
            echo "kept $f unstripped (strip would break it)"
            rm -f "$f.stripped"
        else
            chmod --reference="$f" "$f.stripped" && mv "$f.stripped" "$f"
        fi
    done
}

# prune_tests SITE_PACKAGES: remove the test suites third-party packages ship (numpy, scipy, matplotlib, ...:
# ~50 MB with their bytecode); nothing imports them at run time. CASA's own packages are left whole.
prune_tests() {
    find "$1" -mindepth 2 -type d -name tests -prune \
        ! -path "$1/casa*" ! -path "$1/almatasks/*" -exec rm -rf {} +
}

# compile_tree DIR: Python bytecode at build time (a read-only root cannot cache it later).
compile_tree() {
    "${2:-python3}" -m compileall -q -j 0 "$1" >/dev/null || true
}

# dedupe DIR: hard-link identical files under DIR (casaplotms and casaviewer each bundle the same Qt).
dedupe() {
    python3 - "$1" <<'PY'
import hashlib, os, stat, sys
seen = {}
saved = 0
for root, _dirs, files in os.walk(sys.argv[1]):
    for name in files:
        path = os.path.join(root, name)
        info = os.lstat(path)
        if not stat.S_ISREG(info.st_mode) or info.st_size < 65536:
            continue
        with open(path, "rb") as f:
            key = (info.st_size, info.st_mode, hashlib.sha256(f.read()).hexdigest())
        first = seen.setdefault(key, path)
        if first != path and not os.path.samefile(first, path):
            os.unlink(path)
            os.link(first, path)
            saved += info.st_size
print("dedupe: %d MB hard-linked" % (saved >> 20))
PY
}

# open_tree DIR: readable by every uid, writable by none but root (AppImage trees unpack as 0700).
open_tree() {
    chmod -R u+rwX,go+rX,go-w "$1"
}

# link_measures CASA_HOME MOUNT: CASA before 6.6.4 (catalog `data: bundled`) ignores casaconfig and its site
# config and reads measures from the data it bundles: <casa>/data (CASA 4/5) or
# site-packages/casadata/__data__ (CASA 6). Its time-dependent measures (geodetic: IERS tables, leap
# seconds, observatories; ephemerides) become links into the mounted measures tree; the rest of the bundled
# data (antenna, beam and calibration tables that belong to the release) stays.
link_measures() {
    roots=$(find "$1" \( -path "$1/data" -o -path '*/casadata/__data__' \) -type d -prune)
    if [ -z "$roots" ]; then
        echo "casaspawner: $1 bundles no measures data (no data/ or casadata/__data__ directory)" >&2
        exit 1
    fi
    printf '%s\n' "$roots" | while IFS= read -r root; do
        for part in geodetic ephemerides; do
            rm -rf "${root:?}/$part"
            ln -s "$2/$part" "$root/$part"
            echo "linked $root/$part -> $2/$part"
        done
    done
}

# register_kernel PYTHON KERNEL_ID DISPLAY_NAME [PYTHONPATH]: a kernelspec in the session environment, so
# JupyterLab (from /opt/session) offers CASA's interpreter as a kernel, and makes it the default kernel. That
# setting goes into the environment's jupyter_server_config.json: from jupyter_server_config.d the server
# reads only which extensions are enabled.
register_kernel() {
    /opt/session/bin/python - "$1" "$2" "$3" "${4:-}" /opt/session <<'PY'
import json, os, sys
python, kernel_id, display, pythonpath, env = sys.argv[1:]
spec = {
    "argv": [python, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
    "display_name": display,
    "language": "python",
    "metadata": {"debugger": True, "casaspawner": {"kernel": kernel_id}},
}
if pythonpath:
    spec["env"] = {"PYTHONPATH": pythonpath}
server_config = f"{env}/etc/jupyter/jupyter_server_config.json"
config = {}
if os.path.exists(server_config):
    with open(server_config) as f:
        config = json.load(f)
config.setdefault("MappingKernelManager", {})["default_kernel_name"] = kernel_id
for path, content in ((f"{env}/share/jupyter/kernels/{kernel_id}/kernel.json", spec), (server_config, config)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(content, f, indent=1)
        f.write("\n")
PY
}

# install_casaspawner WHEEL_DIR: the casaspawner wheel (built from the checkout by the build tool) into the
# session environment, with the data files it carries; no dependencies are fetched (the session's pins
# already hold them, which is checked). Its desktop files become /opt/casaspawner/desktop.
install_casaspawner() {
    /opt/session/bin/pip install -q --no-deps --no-index "$1"/casaspawner-*.whl
    if /opt/session/bin/pip check 2>&1 | grep '^casaspawner '; then
        echo "casaspawner: the session environment lacks a dependency of casaspawner" >&2
        exit 1
    fi
    package=$(/opt/session/bin/python -c 'import casaspawner, os; print(os.path.dirname(casaspawner.__file__))')
    /opt/session/bin/python -c 'import casaspawner.insession.notices'
    mkdir -p /opt/casaspawner
    rm -rf /opt/casaspawner/desktop
    ln -s "$package/insession/desktop" /opt/casaspawner/desktop
    # jupyter-remote-desktop-proxy starts the first vncserver on PATH: ours, which picks the display
    # and, for a desktop whose apps run in pods, listens on TCP too.
    ln -sf /opt/casaspawner/desktop/bin/vncserver /usr/local/bin/vncserver
    rm -rf "$1"
}

# harden: nothing outside /tmp world-writable (the opposite of `chmod 777`); no mount point of the build
# secret is left behind.
harden() {
    find / -xdev \( -path /proc -o -path /sys -o -path /dev -o -path /tmp \) -prune \
        -o ! -type l -perm -o+w -exec chmod o-w {} +
    rmdir /run/secrets 2>/dev/null || true
}

#!/bin/sh
# Shared steps of the CASA recipes (run as root at build time, never at run time).
set -eu

# extract_appimages DIR: replace every AppImage under DIR by its extracted tree (no FUSE in containers);
# the AppImage path becomes a link to the tree's AppRun, so callers that run the AppImage keep working.
extract_appimages() {
    find "$1" -type f -name '*.AppImage' | while read -r app; do
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

# strip_debug DIR...: drop debug sections from the ELF files under the given directories (the extracted
# casaplotms/casaviewer AppImages and casatools carry ~1.5 GB of them). Code and symbol tables stay. Only
# trees CASA builds itself are given: `strip` corrupts libraries edited by patchelf, as in other pip wheels
# (scipy's bundled OpenBLAS: "ELF load command address/offset not page-aligned"). As a guard, a stripped copy
# replaces its file only if the dynamic loader still accepts it.
strip_debug() {
    find "$@" -type f -size +1M | while read -r f; do
        [ "$(head -c4 "$f" | tail -c3)" = ELF ] || continue
        strip --strip-debug -o "$f.stripped" "$f" 2>/dev/null || { rm -f "$f.stripped"; continue; }
        if ldd "$f.stripped" 2>&1 | grep -q 'page-aligned'; then
            echo "kept $f unstripped (strip would break it)"
            rm -f "$f.stripped"
        else
            chmod --reference="$f" "$f.stripped" && mv "$f.stripped" "$f"
        fi
    done
}

# appdirs DIR: the extracted AppImage trees under DIR.
appdirs() {
    find "$1" -type d -name '*.AppDir' -prune
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

# register_kernel PYTHON KERNEL_ID DISPLAY_NAME [PYTHONPATH]: a kernelspec in the session environment, so
# JupyterLab (from /opt/session) offers CASA's interpreter as a kernel, and makes it the default kernel.
register_kernel() {
    spec=/opt/session/share/jupyter/kernels/$2
    mkdir -p "$spec"
    /opt/session/bin/python - "$1" "$2" "$3" "${4:-}" "$spec/kernel.json" <<'PY'
import json, sys
python, kernel_id, display, pythonpath, out = sys.argv[1:]
spec = {
    "argv": [python, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
    "display_name": display,
    "language": "python",
    "metadata": {"debugger": True, "casaspawner": {"kernel": kernel_id}},
}
if pythonpath:
    spec["env"] = {"PYTHONPATH": pythonpath}
with open(out, "w") as f:
    json.dump(spec, f, indent=1)
PY
    mkdir -p /opt/session/etc/jupyter/jupyter_server_config.d
    printf '{"MultiKernelManager": {"default_kernel_name": "%s"}}\n' "$2" \
        >/opt/session/etc/jupyter/jupyter_server_config.d/casaspawner-kernel.json
}

# harden: nothing outside /tmp world-writable (the opposite of `chmod 777`).
harden() {
    find / -xdev \( -path /proc -o -path /sys -o -path /dev -o -path /tmp \) -prune \
        -o ! -type l -perm -o+w -exec chmod o-w {} +
}

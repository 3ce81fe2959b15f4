#!/bin/sh
# casaspawner session entrypoint: run the command as whatever uid the pod was given.
#
# - An arbitrary uid gets a passwd/group entry through nss_wrapper (files written in $TMPDIR, never /etc).
# - HOME is the mounted storage; when it is missing or not writable, a private directory in $TMPDIR is used.
# - Everything else that must be writable (XDG/Jupyter runtime dirs, X11 sockets) lives in $TMPDIR, so the
#   root filesystem can be read-only.
set -eu

uid=$(id -u)
gid=$(id -g)
TMPDIR=${TMPDIR:-/tmp}
export TMPDIR

if [ -n "${HOME:-}" ] && [ "$HOME" != / ] && [ ! -d "$HOME" ]; then
    mkdir -p "$HOME" 2>/dev/null || true
fi
if [ -z "${HOME:-}" ] || [ "$HOME" = / ] || [ ! -d "$HOME" ] || [ ! -w "$HOME" ]; then
    echo "casaspawner: HOME ${HOME:-(unset)} is not writable; using $TMPDIR/home-$uid" >&2
    HOME=$TMPDIR/home-$uid
    mkdir -p -m 0700 "$HOME"
fi
export HOME

name=$(printf '%s' "${NB_USER:-${JUPYTERHUB_USER:-casa}}" | tr -c 'A-Za-z0-9._-' '_' | cut -c1-32)
if ! getent passwd "$uid" >/dev/null 2>&1; then
    if getent passwd "$name" >/dev/null 2>&1; then
        name="$name-$uid"
    fi
    nss=$(mktemp -d "$TMPDIR/casaspawner-nss.XXXXXX")
    { cat /etc/passwd; printf '%s:x:%s:%s:%s:%s:/bin/bash\n' "$name" "$uid" "$gid" "casaspawner user" "$HOME"; } \
        >"$nss/passwd"
    cp /etc/group "$nss/group"
    if ! getent group "$gid" >/dev/null 2>&1; then
        printf '%s:x:%s:\n' "$name" "$gid" >>"$nss/group"
    fi
    chmod 0644 "$nss/passwd" "$nss/group"
    export NSS_WRAPPER_PASSWD="$nss/passwd" NSS_WRAPPER_GROUP="$nss/group"
    export LD_PRELOAD="libnss_wrapper.so${LD_PRELOAD:+ $LD_PRELOAD}"
else
    name=$(getent passwd "$uid" | cut -d: -f1)
fi
export USER="$name" LOGNAME="$name"

XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-$TMPDIR/runtime-$uid}
mkdir -p -m 0700 "$XDG_RUNTIME_DIR"
export XDG_RUNTIME_DIR
export JUPYTER_RUNTIME_DIR="${JUPYTER_RUNTIME_DIR:-$XDG_RUNTIME_DIR/jupyter}"
export SHELL=/bin/bash

# Start in HOME unless the pod chose a working directory.
case "$(pwd)" in / | "$TMPDIR") cd "$HOME" ;; esac

exec "$@"

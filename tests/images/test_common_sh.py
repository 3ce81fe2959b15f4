"""The build steps of images/common.sh that work on plain directories, run on this host with
/bin/sh (as the recipes' RUN steps do), on paths with spaces and leading or trailing blanks. No
containers."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from casaspawner.images.engine import recipes_dir

COMMON_SH = recipes_dir() / "common.sh"


def common_sh(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``script`` in ``sh`` after sourcing common.sh, with ``args`` as ``$1``...; ``set -eu`` as in
    the recipes."""
    return subprocess.run(
        ["sh", "-c", f'. "{COMMON_SH}"; {script}', "sh", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=60,
    )


def test_link_measures_links_every_bundled_data_root_on_a_path_with_spaces(tmp_path: Path) -> None:
    # The tree's name comes from the tarball.
    home = tmp_path / "opt casa" / "casa 6.6.1-17"
    roots = [home / "data", home / "lib" / "py" / "site packages" / "casadata" / "__data__"]
    for root in roots:
        for part in ("geodetic", "ephemerides", "alma"):
            (root / part).mkdir(parents=True)
    result = common_sh('link_measures "$1" "$2"', str(home), "/opt/casa/measures", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for root in roots:
        assert os.readlink(root / "geodetic") == "/opt/casa/measures/geodetic"
        assert os.readlink(root / "ephemerides") == "/opt/casa/measures/ephemerides"
        # The release's own data stays.
        assert (root / "alma").is_dir() and not (root / "alma").is_symlink()
    assert sorted(result.stdout.splitlines()) == sorted(
        f"linked {root}/{part} -> /opt/casa/measures/{part}"
        for root in roots
        for part in ("geodetic", "ephemerides")
    )


def test_link_measures_refuses_a_tree_without_bundled_data(tmp_path: Path) -> None:
    (tmp_path / "casa x" / "bin").mkdir(parents=True)
    result = common_sh(
        'link_measures "$1" /opt/casa/measures', str(tmp_path / "casa x"), cwd=tmp_path
    )
    assert result.returncode == 1
    assert result.stderr == (
        f"casaspawner: {tmp_path}/casa x bundles no measures data (no data/ or casadata/__data__ "
        "directory)\n"
    )


FAKE_APPIMAGE = """#!/bin/sh
# What an AppImage does with --appimage-extract: its tree, as squashfs-root/ in the working
# directory (whose AppRun names the AppImage it came from).
[ "$1" = --appimage-extract ] || exit 2
mkdir -p squashfs-root
printf '#!/bin/sh\\necho AppRun of %s\\n' "$(basename "$0")" >squashfs-root/AppRun
chmod 0755 squashfs-root/AppRun
"""


def test_extract_appimages_keeps_blanks_in_the_path(tmp_path: Path) -> None:
    # A relative tree whose name starts with a blank: `read -r` without IFS= would drop it.
    bin_dir = tmp_path / " casa" / "site packages" / "casaplotms" / "__bin__"
    bin_dir.mkdir(parents=True)
    (bin_dir / "casaplotms-x86_64.AppImage").write_text(FAKE_APPIMAGE)
    result = common_sh('extract_appimages "$1"', " casa", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    app = bin_dir / "casaplotms-x86_64.AppImage"
    assert os.readlink(app) == "casaplotms-x86_64.AppDir/AppRun"
    ran = subprocess.run([str(app)], capture_output=True, text=True, check=True)
    # The tree its own AppImage unpacked.
    assert ran.stdout == f"AppRun of {app.name}\n"
    assert result.stdout == f"extracted  casa/site packages/casaplotms/__bin__/{app.name}\n"


def test_strip_symbols_handles_a_file_name_ending_in_a_blank(tmp_path: Path) -> None:
    objcopy, readelf = shutil.which("objcopy"), shutil.which("readelf")
    assert objcopy and readelf and shutil.which("strip"), (
        "binutils is not installed (make test installs it)"
    )
    # A real ELF file over 1 MB: /bin/true with 2 MB of debug data, which `strip --strip-unneeded`
    # drops.
    (tmp_path / "pad").write_bytes(b"\0" * (2 << 20))
    lib = tmp_path / "apps dir" / "libcasa.so "
    lib.parent.mkdir()
    subprocess.run(
        [objcopy, "--add-section", f".debug_casa={tmp_path / 'pad'}", "/bin/true", str(lib)],
        check=True,
    )
    assert (
        ".debug_casa"
        in subprocess.run([readelf, "-S", str(lib)], capture_output=True, text=True).stdout
    )
    mode = lib.stat().st_mode
    result = common_sh('strip_symbols "$1"', str(lib.parent), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    sections = subprocess.run(
        [readelf, "-S", str(lib)], capture_output=True, text=True, check=True
    ).stdout
    assert ".debug_casa" not in sections and lib.stat().st_size < 1 << 20
    assert lib.stat().st_mode == mode and not list(lib.parent.glob("*.stripped"))
    # Still /bin/true.
    assert subprocess.run([str(lib)]).returncode == 0

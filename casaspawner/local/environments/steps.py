"""The steps of building an environment: run commands, download, verify, unpack, check."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path

from casaspawner import tarballs
from casaspawner.errors import CasaspawnerError
from casaspawner.local.environments.progress import TransferMeter


class EnvironmentBuildError(CasaspawnerError):
    """A CASA environment could not be built, or cannot be built here."""


def replace_dir(new: Path, target: Path) -> None:
    """Put ``new`` at ``target`` by rename.

    A stale ``target`` is moved aside first, then removed.
    """
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
        os.rename(target, old / "env")
        shutil.rmtree(old, ignore_errors=True)
    os.rename(new, target)


async def one_sentence(steps: AsyncIterator[str], what: str) -> AsyncIterator[str]:
    """Pass on ``steps``, turning a file-system error into one sentence.

    Such an error is an unwritable cache or a full disk, for example.
    """
    try:
        async for message in steps:
            yield message
    except OSError as error:
        where = f" ({error.filename})" if getattr(error, "filename", None) else ""
        raise EnvironmentBuildError(f"{what} failed: {error.strerror or error}{where}.") from None


def executable(path: Path) -> bool:
    return bool(path.stat().st_mode & 0o100)


def atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def readable_by_all(root: Path) -> None:
    """Make a tree readable by all, like ``chmod -R a+rX``.

    AppImages unpack with private directories, but every session user runs them.
    """
    for dirpath, _dirs, files in os.walk(root):
        # Every session runs them.
        os.chmod(dirpath, os.stat(dirpath).st_mode | 0o555)  # noqa: S103
        for name in files:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                mode = os.stat(path).st_mode
                os.chmod(path, mode | 0o444 | (0o111 if mode & 0o100 else 0))


def make_read_only(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, 0o444)
        # Shared read-only data.
        os.chmod(dirpath, 0o555)  # noqa: S103


@contextlib.asynccontextmanager
async def locked(path: Path) -> AsyncIterator[bool]:
    """Hold an exclusive ``flock`` on ``path``.

    Yields whether it had to wait for another holder.
    """
    # Held for the duration of the context.
    handle = open(path, "a")  # noqa: SIM115
    waited = False
    try:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                waited = True
                await asyncio.sleep(0.5)
        yield waited
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


async def stream(
    cmd: list[str], what: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> AsyncGenerator[str, None]:
    """Run ``cmd``, yielding its output lines.

    A failure raises one sentence ending in the last line.
    """
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env, cwd=cwd
    )
    assert proc.stdout is not None
    tail: list[str] = []
    try:
        async for raw in proc.stdout:
            line = raw.decode(errors="replace").strip()
            if line and not line.startswith("WARNING: Location"):
                # pip's download progress says nothing about a failure.
                if not line.startswith("Progress "):
                    tail = [*tail[-19:], line]
                yield line
        code = await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    if code != 0:
        errors = (
            [t.removeprefix("ERROR: ") for t in tail if t.startswith("ERROR")]
            or tail
            or ["no output"]
        )
        raise EnvironmentBuildError(f"{what} failed: {errors[-1][:300].rstrip('.')}.")


async def run(
    cmd: list[str], what: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> None:
    async for _line in stream(cmd, what, env, cwd):
        pass


async def succeeds(cmd: list[str]) -> bool:
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    return await proc.wait() == 0


#: The offline start check of a Python-3 CASA.
#:
#: It prints casatools' version and imports the GUI task packages the CASA has.
_START_CHECK_PY3 = (
    "\n"
    "import importlib.util, casatools\n"
    "print('CASA-VERSION', casatools.version_string())\n"
    "for name in ('casaplotms', 'casaviewer'):\n"
    "    if importlib.util.find_spec(name) is not None:\n"
    "        try:\n"
    "            importlib.import_module(name)\n"
    "        except Exception as error:\n"
    "            raise SystemExit('%s cannot be imported (%s: %s)' % "
    "(name, type(error).__name__, str(error).splitlines()[0]))\n"
)


async def casa_version(python: Path, site_config: Path, kernel_site: Path | None) -> str:
    """Start casatools offline with the site config and return its version.

    It runs with a throwaway HOME and proxies pointing nowhere.
    """
    with tempfile.TemporaryDirectory(prefix="casaspawner-check-") as home:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": home,
            "CASASITECONFIG": str(site_config),
            "PYTHONNOUSERSITE": "1",
            **{
                key: "http://127.0.0.1:9"
                for key in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")
            },
        }
        if kernel_site is not None:
            env["PYTHONPATH"] = str(kernel_site)
        code = _START_CHECK_PY3
        check = stream([str(python), "-c", code], "Starting casatools offline", env, Path(home))
        lines = [line async for line in check]
    version = next(
        (line.split()[-1] for line in lines if line.startswith("CASA-VERSION ")), "unknown"
    )
    return version


#: What :func:`casa_starts` runs inside CASA 4/5, then leaves without a prompt.
#:
#: It works in Python 2 and 3 alike.
_START_CHECK = (
    "import os, sys\nsys.stdout.write('CASA-STARTED\\n')\nsys.stdout.flush()\nos._exit(0)\n"
)


async def casa_starts(launcher: Path, label: str, timeout: float = 600) -> None:
    """Check that a Python-2 CASA starts and runs a script offline.

    It runs ``bin/casa --nogui --nologger -c <script>`` with a throwaway HOME.
    """
    with tempfile.TemporaryDirectory(prefix="casaspawner-check-") as home:
        script = Path(home) / "casaspawner_check.py"
        script.write_text(_START_CHECK)
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": home,
            **{
                key: "http://127.0.0.1:9"
                for key in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")
            },
        }
        cmd = [str(launcher), "--nogui", "--nologger", "--log2term", "-c", str(script)]

        async def lines() -> list[str]:
            # Closed on a timeout too, which kills the hung CASA (``stream``'s ``finally``).
            output = stream(cmd, f"Starting {label}", env, Path(home))
            async with contextlib.aclosing(output) as lines_out:
                return [line async for line in lines_out]

        try:
            output = await asyncio.wait_for(lines(), timeout)
        # TimeoutError and asyncio.TimeoutError are one class from Python 3.11 on, not on 3.10.
        except (TimeoutError, asyncio.TimeoutError):
            raise EnvironmentBuildError(
                f"{label} did not start within {int(timeout)} seconds."
            ) from None
    if "CASA-STARTED" not in output:
        raise EnvironmentBuildError(
            f"{label} started but did not run a script: {(output or ['no output'])[-1][:300]}."
        )


async def download(url: str, target: Path, label: str) -> AsyncIterator[str]:
    """Download ``url`` to ``target``, yielding :class:`Progress` with size, rate and time left.

    The download goes to a partial file first.
    """
    queue: asyncio.Queue[str | None] = asyncio.Queue()
    loop = asyncio.get_running_loop()

    def fetch() -> None:
        partial = target.with_name(target.name + ".partial")
        try:
            with (
                urllib.request.urlopen(url, timeout=60) as response,  # noqa: S310
                open(partial, "wb") as out,
            ):
                total = int(response.headers.get("Content-Length") or 0)
                meter = TransferMeter(f"Downloading {label}", total)
                done = 0
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    done += len(chunk)
                    loop.call_soon_threadsafe(queue.put_nowait, meter.update(done))
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
            loop.call_soon_threadsafe(queue.put_nowait, None)

    task = asyncio.create_task(asyncio.to_thread(fetch))
    while (message := await queue.get()) is not None:
        yield message
    try:
        await task
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise EnvironmentBuildError(f"Downloading {url} failed: {reason}.") from None


#: pip's machine-readable download progress (``--progress-bar raw``), from pip 24.1 on.
RAW_PROGRESS_PIP = (24, 1)


async def pip_version(python: Path | str) -> tuple[int, ...]:
    """The version of ``python -m pip``, e.g. ``(24, 2)``; ``()`` when it has none."""
    proc = await asyncio.create_subprocess_exec(
        str(python),
        "-m",
        "pip",
        "--version",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    out, _ = await proc.communicate()
    words = out.decode(errors="replace").split()
    if proc.returncode != 0 or len(words) < 2:
        return ()
    parts = []
    for part in words[1].split("."):
        if not part.isdigit():
            break
        parts.append(int(part))
    return tuple(parts)


async def pip_install(
    python: Path | str, args: list[str], what: str, env: dict[str, str] | None = None
) -> AsyncIterator[str]:
    """Run ``python -m pip install *args``, yielding what it does.

    Its steps (collecting, downloading, installing) are yielded as sentences, and each download's
    progress as :class:`Progress` with size, rate and time left, when the pip is recent enough to
    report it. A failure raises one sentence ending in pip's error.
    """
    raw = await pip_version(python) >= RAW_PROGRESS_PIP
    cmd = [str(python), "-m", "pip", "install", "--no-input", "--disable-pip-version-check"]
    cmd += ["--progress-bar", "raw" if raw else "off", *args]
    meter: TransferMeter | None = None
    async for line in stream(cmd, what, env):
        if line.startswith("Progress ") and meter is not None:
            words = line.split()
            if len(words) == 4 and words[1].isdigit() and words[3].isdigit():
                meter.total = meter.total or int(words[3])
                yield meter.update(int(words[1]))
            continue
        if line.startswith("Downloading "):
            name = line.removeprefix("Downloading ").split(" (")[0].rsplit("/", 1)[-1]
            meter = TransferMeter(f"Downloading {name}", 0)
        if line.startswith(("Collecting ", "Downloading ", "Installing collected")):
            yield line[:160]


def verify(archive: Path, url: str, sha256: str | None, timeout: float) -> None:
    """Check a downloaded tarball's checksum.

    That is the catalog's SHA-256, else the ``.md5`` published next to the tarball. See
    ``casaspawner.tarballs``.
    """
    try:
        tarballs.verify_file(archive, *tarballs.expected_checksum(url, sha256, timeout))
    except tarballs.ChecksumError as error:
        raise EnvironmentBuildError(str(error)) from None


async def extract_appimage(appimage: Path, target: Path) -> None:
    """Extract an AppImage into ``target``.

    Runs ``--appimage-extract`` and points the AppImage's path at the extracted ``AppRun``.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".extract.", dir=target.parent))
    try:
        # An executable every user runs.
        os.chmod(appimage, 0o755)  # noqa: S103
        await run([str(appimage), "--appimage-extract"], f"Extracting {appimage.name}", cwd=work)
        (work / "squashfs-root").rename(target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    readable_by_all(target)
    appimage.unlink()
    appimage.symlink_to(os.path.relpath(target / "AppRun", appimage.parent))

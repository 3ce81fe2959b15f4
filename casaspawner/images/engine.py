"""Container tools: find them, probe this host, make a base, and build recipes.

This module finds a builder (buildah or docker) and a runner (podman or docker), and works out the
runtime options this host needs. It makes a local Debian base with mmdebstrap, and builds recipes,
reusing images whose input hash is unchanged.

Every host-specific workaround is detected by trying the plain way first, and each can be forced
from the command line. The workarounds are a containers.conf without default ulimits,
``--runtime runc --cgroup-manager cgroupfs``, chroot isolation, and host networking when bridge
networking fails.

The build host's CA bundle reaches build steps as a build secret, with buildah and docker BuildKit
alike. So nothing of it is left in an image.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from casaspawner import __version__, net, tarballs
from casaspawner.images.matrix import (
    INPUT_HASH_LABEL,
    ImageBuildError,
    Recipe,
    input_hash,
    parent_reference,
    with_tarball_checksum,
)

CACHE_DIR = (
    Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "casaspawner" / "images"
)
# The build secret id: /run/secrets/casaspawner-ca.
CA_SECRET = "casaspawner-ca"  # noqa: S105
# Global podman flags.
RUNTIME_FLAGS = ("--runtime", "runc", "--cgroup-manager", "cgroupfs")
# SOURCE_DATE_EPOCH of the casaspawner wheel, 1980-01-01: the same tree gives the same bytes.
WHEEL_EPOCH = "315532800"
Builder = Literal["buildah", "docker"]


#: Where a wheel installs the recipes, relative to the installation prefix.
#:
#: See ``[options.data_files]``.
INSTALLED_RECIPES = Path("share", "casaspawner", "images")


def source_checkout() -> Path | None:
    """Return the source checkout this casaspawner runs from, if any.

    It runs from one as an editable install or through ``PYTHONPATH``.
    """
    root = Path(__file__).resolve().parents[2]
    return root if (root / "setup.cfg").is_file() and (root / "pyproject.toml").is_file() else None


def recipes_dir() -> Path:
    """Return the directory of the image recipes.

    That is the checkout's ``images/`` when casaspawner runs from one. Otherwise it is the copy its
    wheel installed, ``share/casaspawner/images`` under the installation's prefix. That copy is
    found through the record of installed files, else beside the package as
    ``pip install --target`` leaves it, else under ``sys.prefix``.
    """
    checkout = source_checkout()
    candidates = [checkout / "images"] if checkout is not None else []
    try:
        files = importlib.metadata.distribution("casaspawner").files or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    marker = (INSTALLED_RECIPES / "common.sh").as_posix()
    candidates += [Path(f.locate()).parent for f in files if f.as_posix().endswith(marker)]
    prefix = Path(sys.prefix) / INSTALLED_RECIPES
    candidates += [Path(__file__).resolve().parents[2] / INSTALLED_RECIPES, prefix]
    for candidate in candidates:
        if (candidate / "common.sh").is_file():
            return candidate.resolve()
    raise ImageBuildError(
        "the image recipes are missing: "
        f"neither a source checkout's images/ nor {prefix} has them "
        "(reinstall casaspawner from its wheel)."
    )


@dataclass
class Tools:
    """The container tools this host has and the options they need here."""

    builder: Builder
    #: "podman" or "docker".
    runner: str
    #: Environment for the tools, e.g. CONTAINERS_CONF.
    env: dict[str, str] = field(default_factory=dict)
    #: Global flags for `podman run`.
    run_flags: tuple[str, ...] = ()
    #: What smoke tests publish ports from: "host" where bridge networking fails.
    network: str = "bridge"
    #: buildah --isolation.
    isolation: str | None = None
    ca_bundle: Path | None = None
    log_dir: Path = CACHE_DIR / "logs"

    def run(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float | None = None,
        capture: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, **self.env}
        result = subprocess.run(
            list(argv), env=env, capture_output=capture, text=True, timeout=timeout
        )
        if check and result.returncode != 0:
            command = " ".join(argv[:3])
            raise ImageBuildError(f"`{command} …` failed: {_last_line(result.stderr)}.")
        return result

    # Images

    def image_id(self, reference: str) -> str | None:
        result = self.run(
            [self.runner, "image", "inspect", "--format", "{{.Id}}", reference], check=False
        )
        return result.stdout.strip() or None if result.returncode == 0 else None

    def image_labels(self, reference: str) -> dict[str, str]:
        result = self.run([self.runner, "image", "inspect", reference], check=False)
        if result.returncode != 0:
            return {}
        data = json.loads(result.stdout)[0]
        labels = data.get("Labels") or data.get("Config", {}).get("Labels") or {}
        return {str(k): str(v) for k, v in labels.items()}

    def image_size(self, reference: str) -> int:
        result = self.run([self.runner, "image", "inspect", "--format", "{{.Size}}", reference])
        return int(result.stdout.strip())

    def container(self, *args: str) -> list[str]:
        """Return argv for a runner command with this host's global runtime flags.

        The command is e.g. `run`, `kube play` or `exec`.
        """
        return [self.runner, *self.run_flags, *args]


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("casaspawner:"):
            return line.removeprefix("casaspawner:").strip().rstrip(".")
    return (lines[-1] if lines else "no output").rstrip(".")


def detect_tools(
    builder: str = "auto",
    runtime_flags: str = "auto",
    containers_conf: str = "auto",
    isolation: str = "auto",
    ca_bundle: str = "auto",
    probe_image: str | None = None,
) -> Tools:
    """Pick the builder and the runner for this host.

    With ``probe_image``, also pick the runtime options that make `run` work.
    """
    if builder == "auto":
        if shutil.which("buildah"):
            builder = "buildah"
        elif shutil.which("docker") and _docker_works():
            builder = "docker"
        else:
            raise ImageBuildError(
                "neither buildah nor a working docker is installed; `make deps` installs buildah."
            )
    if builder not in ("buildah", "docker") or not shutil.which(builder):
        raise ImageBuildError(
            f"the image builder {builder!r} is not available; use buildah or docker."
        )
    runner = "podman" if builder == "buildah" else "docker"
    if not shutil.which(runner):
        raise ImageBuildError(f"{runner} is needed next to {builder} to run and inspect images.")
    tools = Tools(builder=builder, runner=runner)  # type: ignore[arg-type]
    if builder == "docker":
        # Build secrets and RUN --mount need BuildKit.
        tools.env["DOCKER_BUILDKIT"] = "1"
    tools.ca_bundle = _ca_bundle(ca_bundle)
    if containers_conf not in ("auto", "none"):
        tools.env["CONTAINERS_CONF"] = str(Path(containers_conf).resolve())
    if runtime_flags not in ("auto", "none"):
        tools.run_flags = tuple(runtime_flags.split())
    if builder == "buildah":
        tools.isolation = None if isolation in ("auto", "default") else isolation
    if probe_image and runner == "podman":
        _probe_runtime(tools, probe_image, runtime_flags == "auto", containers_conf == "auto")
        tools.network = _probe_network(tools, probe_image)
        if isolation == "auto":
            tools.isolation = _probe_isolation(tools, probe_image)
    elif isolation == "auto" and builder == "buildah":
        tools.isolation = "chroot"
    return tools


def _docker_works() -> bool:
    return subprocess.run(["docker", "info"], capture_output=True).returncode == 0


def _ca_bundle(choice: str) -> Path | None:
    if choice == "none":
        return None
    if choice != "auto":
        path = Path(choice)
        if not path.is_file():
            raise ImageBuildError(f"the CA bundle {choice} is not a file.")
        return path.resolve()
    for candidate in (os.environ.get("SSL_CERT_FILE"), "/etc/ssl/certs/ca-certificates.crt"):
        if candidate and Path(candidate).is_file():
            return Path(candidate).resolve()
    return None


def _write_containers_conf() -> Path:
    path = CACHE_DIR / "containers.conf"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "# Written by casaspawner images: "
        "this host refuses the default ulimits podman sets on containers.\n"
        "[containers]\ndefault_ulimits = []\n"
    )
    return path


def _probe_runtime(tools: Tools, image: str, try_flags: bool, try_conf: bool) -> None:
    """Try `podman run IMAGE true` the plain way, then with each workaround.

    The first way that works is kept.
    """
    attempts: list[tuple[dict[str, str], tuple[str, ...]]] = [(dict(tools.env), tools.run_flags)]
    if try_conf:
        conf = {**tools.env, "CONTAINERS_CONF": str(_write_containers_conf())}
        attempts.append((conf, tools.run_flags))
    if try_flags:
        attempts += [(env, RUNTIME_FLAGS) for env, _ in list(attempts)]
    error = ""
    for env, flags in attempts:
        trial = Tools(tools.builder, tools.runner, env=env, run_flags=flags)
        result = trial.run(
            trial.container("run", "--rm", "--network", "none", image, "true"), check=False
        )
        if result.returncode == 0:
            tools.env, tools.run_flags = env, flags
            return
        error = _last_line(result.stderr)
    raise ImageBuildError(f"podman cannot run containers on this host ({error}).")


def _probe_network(tools: Tools, image: str) -> str:
    """Return ``bridge`` when a container gets its own network, else ``host``.

    A pod gets its own network.
    """
    result = tools.run(
        tools.container("run", "--rm", "--network", "bridge", image, "true"), check=False
    )
    return "bridge" if result.returncode == 0 else "host"


def _probe_isolation(tools: Tools, image: str) -> str:
    """Return buildah's default OCI isolation when it works, else chroot."""
    name = f"casaspawner-probe-{os.getpid()}"
    result = tools.run(["buildah", "from", "--name", name, image], check=False)
    if result.returncode != 0:
        return "chroot"
    try:
        probe = tools.run(["buildah", "run", "--isolation", "oci", name, "true"], check=False)
        ok = probe.returncode == 0
    finally:
        tools.run(["buildah", "rm", name], check=False)
    return "oci" if ok else "chroot"


# Base image


@dataclass(frozen=True)
class AptSource:
    uri: str
    suites: tuple[str, ...]
    components: tuple[str, ...]


def parse_apt_sources(texts: Mapping[str, str]) -> list[AptSource]:
    """Parse binary ``deb`` sources from apt source files, in file order.

    The files are deb822 ``*.sources`` and one-line ``*.list`` files.
    """
    sources: list[AptSource] = []
    for name, text in texts.items():
        if name.endswith(".sources"):
            for stanza in text.split("\n\n"):
                fields: dict[str, str] = {}
                for line in stanza.splitlines():
                    if line.startswith("#") or ":" not in line or line[:1].isspace():
                        continue
                    key, _, value = line.partition(":")
                    fields[key.strip().lower()] = value.strip()
                if (
                    "deb" not in fields.get("types", "").split()
                    or fields.get("enabled", "yes") == "no"
                ):
                    continue
                for uri in fields.get("uris", "").split():
                    sources.append(
                        AptSource(
                            uri,
                            tuple(fields.get("suites", "").split()),
                            tuple(fields.get("components", "").split()),
                        )
                    )
        else:
            for line in text.splitlines():
                words = line.split("#", 1)[0].split()
                if len(words) >= 3 and words[0] == "deb":
                    words = (
                        [w for w in words[1:] if not w.startswith("[")]
                        if "[" not in line
                        else _strip_options(words[1:])
                    )
                    sources.append(AptSource(words[0], (words[1],), tuple(words[2:])))
    return [s for s in sources if s.uri.startswith(("http://", "https://", "file:/"))]


def _strip_options(words: list[str]) -> list[str]:
    out, inside = [], False
    for word in words:
        if word.startswith("["):
            inside = True
        if not inside:
            out.append(word)
        if word.endswith("]"):
            inside = False
    return out


def read_host_apt_sources(root: Path = Path("/etc/apt")) -> list[AptSource]:
    files = sorted((root / "sources.list.d").glob("*.sources")) + sorted(
        (root / "sources.list.d").glob("*.list")
    )
    if (root / "sources.list").is_file():
        files.append(root / "sources.list")
    return parse_apt_sources({str(p): p.read_text() for p in files})


def mirror_lines(sources: Iterable[AptSource], suite: str) -> list[str]:
    """Return mmdebstrap mirror lines for ``suite`` from the host's sources.

    The lines cover ``-updates`` and ``-security`` too. ``file:/`` mirrors are left out, since they
    become the base image's apt sources, and a container build cannot reach the host's files.
    """
    given = list(sources)
    sources = [s for s in given if not s.uri.startswith("file:")]
    if given and not sources:
        raise ImageBuildError(
            "the host's apt mirror is a file:/ directory, which container builds cannot reach; "
            "configure an http(s) mirror in /etc/apt/sources.list.d or give --base IMAGE."
        )
    lines: list[str] = []
    for source in sources:
        for wanted in (suite, f"{suite}-updates", f"{suite}-security"):
            if wanted in source.suites:
                lines.append(f"deb {source.uri} {wanted} main")
    if not any(line.split()[2] == suite for line in lines):
        main = next(
            (s for s in sources if not any(x.endswith("-security") for x in s.suites)), None
        )
        if main is None:
            raise ImageBuildError(
                "no Debian mirror is configured in /etc/apt/sources.list.d; give --base IMAGE."
            )
        lines.insert(0, f"deb {main.uri} {suite} main")
    return list(dict.fromkeys(lines))


def mmdebstrap_command(
    suite: str, target: Path, lines: Sequence[str], ca_bundle: Path | None
) -> list[str]:
    """Return the mmdebstrap call for a minbase ``suite``.

    With https mirrors, the base gets ca-certificates, so the image's apt can reach them later. Apt
    trusts ``ca_bundle`` while bootstrapping, without keeping it.
    """
    argv = ["mmdebstrap", "--variant=minbase", "--quiet"]
    if any(line.split()[1].startswith("https://") for line in lines):
        argv.append("--include=ca-certificates")
    if ca_bundle is not None:
        # --aptopt lands in the base's /etc/apt/apt.conf.d/99mmdebstrap. The customize hook
        # removes it again.
        argv += [
            f'--aptopt=Acquire::https::CAInfo "{ca_bundle}"',
            # The CA file need not be readable by _apt.
            '--aptopt=APT::Sandbox::User "root"',
            '--customize-hook=rm -f "$1/etc/apt/apt.conf.d/99mmdebstrap"',
        ]
    return [*argv, suite, str(target), *lines]


def local_base(
    tools: Tools,
    suite: str = "bookworm",
    max_age_days: int = 7,
    log: bool = True,
    sources: Sequence[AptSource] | None = None,
    cache: Path = CACHE_DIR,
) -> str:
    """Return a minbase Debian image made with mmdebstrap from the host's mirror.

    The image is cached by mirror and date.
    """
    if not shutil.which("mmdebstrap"):
        raise ImageBuildError(
            "mmdebstrap is not installed; `make deps` installs it, or give --base IMAGE."
        )
    lines = mirror_lines(read_host_apt_sources() if sources is None else sources, suite)
    key = hashlib.sha256("\n".join(lines).encode()).hexdigest()[:10]
    base_dir = cache / "base"
    base_dir.mkdir(parents=True, exist_ok=True)
    today = dt.datetime.now(dt.timezone.utc).date()
    fresh = [
        p
        for p in sorted(base_dir.glob(f"{suite}-*-{key}.tar"), reverse=True)
        if (today - dt.datetime.strptime(p.name.split("-")[1], "%Y%m%d").date()).days
        < max_age_days
    ]
    if fresh:
        tarball = fresh[0]
    else:
        tarball = base_dir / f"{suite}-{today:%Y%m%d}-{key}.tar"
        if log:
            print(
                f"making a {suite} base with mmdebstrap "
                f"from {len(lines)} mirror line(s) -> {tarball}",
                flush=True,
            )
        partial = tarball.with_suffix(".partial.tar")
        result = tools.run(mmdebstrap_command(suite, partial, lines, tools.ca_bundle), check=False)
        if result.returncode != 0:
            partial.unlink(missing_ok=True)
            raise ImageBuildError(
                f"mmdebstrap could not make a {suite} base: {_last_line(result.stderr)}."
            )
        partial.rename(tarball)
        for old in base_dir.glob(f"{suite}-*-{key}.tar"):
            if old != tarball:
                old.unlink()
    reference = f"localhost/casaspawner-base:{tarball.stem}"
    if tools.image_id(reference) is None:
        tools.run([tools.runner, "import", str(tarball), reference])
    return reference


# Build


def casaspawner_wheel(into: Path, given: Path | None = None, checkout: Path | None = None) -> Path:
    """Return the casaspawner wheel the session layer installs.

    That is ``given``, else a wheel built from ``checkout`` or the source checkout this package
    runs from. The wheel is built with fixed timestamps. An unchanged checkout gives the same
    bytes, so images are not rebuilt for nothing.
    """
    if given is not None:
        if (
            not given.is_file()
            or not given.name.startswith("casaspawner-")
            or given.suffix != ".whl"
        ):
            raise ImageBuildError(
                f"{given} is not a casaspawner wheel (casaspawner-<version>-….whl)."
            )
        return Path(shutil.copy2(given, into / given.name))
    root = checkout or source_checkout()
    if root is None:
        raise ImageBuildError(
            "casaspawner runs from an installed package, not a source checkout, "
            "so it cannot build the wheel the session image installs; "
            "give --casaspawner-wheel FILE "
            f"(e.g. from `pip download casaspawner=={__version__} --no-deps`)."
        )
    source = into / "source"
    source.mkdir()
    skip = {"build", "dist", "docs", "tests", "benchmarks", "demo", "node_modules"}
    for entry in sorted(root.iterdir()):
        if entry.name.startswith(".") or entry.name in skip or entry.name.endswith(".egg-info"):
            continue
        if entry.is_dir():
            ignore = shutil.ignore_patterns(
                "__pycache__", "*.pyc", "*.log", "_build", "node_modules"
            )
            shutil.copytree(entry, source / entry.name, ignore=ignore)
        else:
            shutil.copy2(entry, source / entry.name)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--wheel-dir",
            str(into),
            str(source),
        ],
        env={**os.environ, "SOURCE_DATE_EPOCH": WHEEL_EPOCH},
        capture_output=True,
        text=True,
    )
    shutil.rmtree(source, ignore_errors=True)
    wheels = sorted(into.glob("casaspawner-*.whl"))
    if result.returncode != 0 or not wheels:
        raise ImageBuildError(
            f"building the casaspawner wheel failed: {_last_line(result.stderr)}."
        )
    return wheels[-1]


def assemble_context(
    recipe: Recipe, recipes: Path, into: Path, wheel: Path | None = None
) -> dict[str, bytes]:
    """Fill the build context ``into``, and return the context's files.

    The context gets the recipe directory, the shared ``common.sh`` and the release's pip
    constraints (``constraints.txt``). Monolithic builds get ``tarballs.py`` and ``net.py``.
    Everything built on the session base gets the casaspawner wheel, in ``wheels/``.
    """
    source = recipes / recipe.context
    if not (source / recipe.containerfile).is_file():
        raise ImageBuildError(f"the recipe {source / recipe.containerfile} does not exist.")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "constraints")
    shutil.copytree(source, into, dirs_exist_ok=True, ignore=ignore)
    shutil.copy2(recipes / "common.sh", into / "common.sh")
    # The recipes that run pip.
    if recipe.kind != "session":
        constraints = constraints_path(recipe, recipes)
        text = (
            constraints.read_text()
            if constraints.is_file()
            else "# none yet: dependencies float\n"
        )
        (into / "constraints.txt").write_text(text)
    if recipe.kind == "monolithic":
        shutil.copy2(Path(tarballs.__file__), into / "tarballs.py")
        shutil.copy2(Path(net.__file__), into / "net.py")
    if recipe.kind != "session-base":
        if wheel is None:
            raise ImageBuildError(
                f"{recipe.name} installs casaspawner, but no casaspawner wheel was given."
            )
        (into / "wheels").mkdir(exist_ok=True)
        shutil.copy2(wheel, into / "wheels" / wheel.name)
    return {
        str(p.relative_to(into)): p.read_bytes() for p in sorted(into.rglob("*")) if p.is_file()
    }


def constraints_path(recipe: Recipe, recipes: Path | None = None) -> Path:
    """Return where the pip constraints of ``recipe`` are kept.

    ``casaspawner images constraints`` writes them.
    """
    recipes = recipes or recipes_dir()
    if recipe.release is None:
        return recipes / "session" / "constraints.txt"
    return recipes / "casa" / "constraints" / f"{recipe.name}.txt"


def resolve_checksum(recipe: Recipe, timeout: float = 30) -> Recipe:
    """Make an unpinned monolithic recipe verify against its published MD5.

    Unpinned means without a SHA-256. The MD5 is published next to the recipe's tarball.
    """
    if recipe.kind != "monolithic" or recipe.build_args.get("CASA_TARBALL_CHECKSUM"):
        return recipe
    try:
        algorithm, value = tarballs.expected_checksum(
            recipe.build_args["CASA_TARBALL_URL"], None, timeout
        )
    except tarballs.ChecksumError as error:
        raise ImageBuildError(
            str(error).rstrip(".") + "; pin a SHA-256 with --checksums or --sha256."
        ) from None
    return with_tarball_checksum(recipe, f"{algorithm}:{value}")


@dataclass(frozen=True)
class BuildResult:
    recipe: Recipe
    image_id: str
    input_hash: str
    reused: bool
    seconds: float
    log: Path | None


def build(
    tools: Tools,
    recipe: Recipe,
    wheel: Path | None = None,
    recipes: Path | None = None,
    force: bool = False,
) -> BuildResult:
    """Build one recipe, or reuse its image when nothing changed.

    Nothing changed when the existing image's input hash is unchanged.
    """
    import time

    if recipe.problem:
        raise ImageBuildError(f"{recipe.name} cannot be built: {recipe.problem}.")
    recipes = recipes or recipes_dir()
    recipe = resolve_checksum(recipe)
    parent = parent_reference(recipe)
    parent_id = tools.image_id(parent)
    if parent_id is None and recipe.kind != "session-base":
        raise ImageBuildError(
            f"the session base {parent} is not built yet; build it first (--session)."
        )
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"casaspawner-{recipe.name}-") as tmp:
        context = Path(tmp)
        files = assemble_context(recipe, recipes, context, wheel)
        digest = input_hash(recipe, files, parent_id or parent)
        if not force and tools.image_labels(recipe.image).get(INPUT_HASH_LABEL) == digest:
            image_id = tools.image_id(recipe.image) or ""
            return BuildResult(recipe, image_id, digest, True, time.monotonic() - started, None)
        tools.log_dir.mkdir(parents=True, exist_ok=True)
        log = tools.log_dir / (re.sub(r"[^A-Za-z0-9._-]+", "_", recipe.image) + ".log")
        argv = build_command(tools, recipe, context, digest)
        with log.open("w") as out:
            out.write("$ " + " ".join(argv) + "\n")
            out.flush()
            result = subprocess.run(
                argv, env={**os.environ, **tools.env}, stdout=out, stderr=subprocess.STDOUT
            )
        if result.returncode != 0:
            raise ImageBuildError(
                f"building {recipe.image} failed: "
                f"{_last_line(log.read_text(errors='replace'))} (log: {log})."
            )
    image_id = tools.image_id(recipe.image) or ""
    return BuildResult(recipe, image_id, digest, False, time.monotonic() - started, log)


def build_command(tools: Tools, recipe: Recipe, context: Path, digest: str) -> list[str]:
    """Return the build command for ``recipe``.

    The command is buildah bud, or docker build with BuildKit. The CA bundle, if any, is a build
    secret.
    """
    labels = {**recipe.labels, INPUT_HASH_LABEL: digest}
    containerfile = str(context / recipe.containerfile)
    if tools.builder == "buildah":
        argv = [
            "buildah",
            "bud",
            "--layers",
            "--force-rm",
            "--network",
            "host",
            "-f",
            containerfile,
        ]
        argv += ["-t", recipe.image]
        if tools.isolation:
            argv += ["--isolation", tools.isolation]
    else:
        argv = ["docker", "build", "--network", "host", "-f", containerfile, "-t", recipe.image]
    if tools.ca_bundle:
        argv += ["--secret", f"id={CA_SECRET},src={tools.ca_bundle}"]
    for key, value in recipe.build_args.items():
        argv += ["--build-arg", f"{key}={value}"]
    for key, value in labels.items():
        argv += ["--label", f"{key}={value}"]
    return [*argv, str(context)]

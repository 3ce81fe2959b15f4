"""The ``casaspawner images`` command, for the image set made from the release catalog.

Its actions are ``list``, ``build``, ``test``, ``constraints`` and ``prepuller``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import yaml

from casaspawner.catalog.model import Catalog, load_catalog
from casaspawner.images import engine, smoke
from casaspawner.images.matrix import (
    DEFAULT_BASE_IMAGE,
    DEFAULT_PYTHON,
    LABEL_PREFIX,
    ImageBuildError,
    MatrixOptions,
    Recipe,
    RecipeKind,
    build_matrix,
    casa_home,
    parse_checksums,
    prepuller_values,
    select_releases,
)
from casaspawner.plan import PlanConfig

LOCAL_BASE = "local"


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``images`` to the ``casaspawner`` command line.

    Its actions are list, build, test, constraints and prepuller.
    """
    images = subparsers.add_parser(
        "images", help="list, build and smoke-test the session and CASA images"
    )
    sub = images.add_subparsers(
        dest="images_command", required=True, metavar="ACTION", parser_class=type(images)
    )

    p = sub.add_parser("list", help="print the build matrix: one image per available release")
    _matrix_options(p)
    p.add_argument("--releases", nargs="+", metavar="ID", help="only these catalog ids")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser(
        "build", help="build the session image and CASA images (reusing unchanged ones)"
    )
    _matrix_options(p)
    _tool_options(p)
    p.add_argument(
        "--release", action="append", metavar="ID", help="build this release's image (repeatable)"
    )
    p.add_argument(
        "--session", action="store_true", help="build the session image (implied by --release)"
    )
    p.add_argument(
        "--all", action="store_true", help="build every buildable release in the catalog"
    )
    p.add_argument(
        "--force", action="store_true", help="rebuild even when the input hash is unchanged"
    )
    p.add_argument(
        "--sha256", metavar="HEX", help="SHA-256 of the tarball of the one --release given"
    )
    p.add_argument(
        "--casaspawner-wheel",
        type=Path,
        metavar="FILE",
        help=(
            "the casaspawner wheel to install in the images "
            "(default: built from the source checkout this command runs from; "
            "needed when casaspawner is an installed package)"
        ),
    )
    p.set_defaults(func=cmd_build)

    p = sub.add_parser(
        "test", help="smoke-test built images as a pod runs them (uid 54321, read-only root)"
    )
    _matrix_options(p)
    _tool_options(p)
    p.add_argument(
        "--release", action="append", metavar="ID", help="test this release's image (repeatable)"
    )
    p.add_argument("--session", action="store_true", help="test the session image")
    p.add_argument(
        "--measures",
        type=Path,
        metavar="DIR",
        help="casarundata (or casadata __data__) to mount read-only",
    )
    p.add_argument("--json", action="store_true", help="print the observations as JSON")
    p.set_defaults(func=cmd_test)

    p = sub.add_parser(
        "constraints",
        help=(
            "write the pip constraints of built images "
            "(every installed package, pinned) for later builds"
        ),
    )
    _matrix_options(p)
    _tool_options(p)
    p.add_argument(
        "--release", action="append", metavar="ID", help="this release's image (repeatable)"
    )
    p.add_argument("--session", action="store_true", help="the session image")
    p.set_defaults(func=cmd_constraints)

    p = sub.add_parser(
        "prepuller", help="print a z2jh prePuller.extraImages snippet for the given releases"
    )
    _matrix_options(p)
    p.add_argument(
        "--releases",
        nargs="+",
        metavar="ID",
        help="releases the hub offers (default: all available)",
    )
    p.set_defaults(func=cmd_prepuller)


def _matrix_options(p: argparse.ArgumentParser) -> None:
    default = PlanConfig()
    p.add_argument(
        "--registry",
        default=os.environ.get("CASASPAWNER_IMAGE_REGISTRY", default.image_registry),
        help="image registry (default: %(default)s; env CASASPAWNER_IMAGE_REGISTRY)",
    )
    p.add_argument(
        "--image-template",
        default=default.image_template,
        help="image reference template (default: %(default)s)",
    )
    p.add_argument(
        "--session-tag",
        default=MatrixOptions().session_tag,
        help="session image tag (default: %(default)s)",
    )
    p.add_argument(
        "--base",
        default=DEFAULT_BASE_IMAGE,
        help=(
            f"base image of the session layer, or '{LOCAL_BASE}' "
            "to make a Debian base with mmdebstrap from this host's apt mirror "
            "(default: %(default)s)"
        ),
    )
    p.add_argument(
        "--suite", default="bookworm", help="Debian suite of a local base (default: %(default)s)"
    )
    p.add_argument(
        "--python",
        default=DEFAULT_PYTHON,
        help="Python of the base, used for modular CASA (default: %(default)s)",
    )
    p.add_argument(
        "--tarball-mirror", metavar="URL", help="fetch monolithic tarballs from this directory URL"
    )
    p.add_argument(
        "--checksums",
        type=Path,
        metavar="FILE",
        help="SHA-256 sums of tarballs (sha256sum format)",
    )
    p.add_argument(
        "--catalog", metavar="FILE", help="use this catalog file instead of the bundled one"
    )


def _tool_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--engine", default="auto", choices=("auto", "buildah", "docker"), help="image builder"
    )
    p.add_argument(
        "--ca-bundle",
        default="auto",
        metavar="PATH",
        help=(
            "CA bundle mounted into builds for pip/downloads: a file, "
            "'auto' ($SSL_CERT_FILE or the system bundle) or 'none' (default: %(default)s)"
        ),
    )
    p.add_argument(
        "--isolation",
        default="auto",
        help="buildah isolation: auto (OCI if it works, else chroot), oci, chroot",
    )
    p.add_argument(
        "--runtime-flags",
        default="auto",
        help=(
            "extra `podman run` flags, e.g. '--runtime runc --cgroup-manager cgroupfs'; "
            "auto tries without first; none never adds any (default: %(default)s)"
        ),
    )
    p.add_argument(
        "--containers-conf",
        default="auto",
        metavar="PATH",
        help=(
            "containers.conf for podman/buildah; "
            "auto writes one without default ulimits only when the host refuses them "
            "(default: %(default)s)"
        ),
    )


def _catalog(args: argparse.Namespace) -> Catalog:
    return load_catalog(args.catalog) if args.catalog else load_catalog()


def _options(args: argparse.Namespace, base: str | None = None) -> MatrixOptions:
    checksums: dict[str, str] = {}
    if args.checksums:
        try:
            checksums = parse_checksums(args.checksums.read_text())
        except OSError as exc:
            raise ImageBuildError(
                f"cannot read the checksum file {args.checksums}: {exc.strerror}."
            ) from None
    shown_base = base or (
        "localhost/casaspawner-base:<made by mmdebstrap>" if args.base == LOCAL_BASE else args.base
    )
    return MatrixOptions(
        registry=args.registry,
        image_template=args.image_template,
        session_tag=args.session_tag,
        base_image=shown_base,
        python=args.python,
        tarball_mirror=args.tarball_mirror,
        checksums=checksums,
    )


def cmd_list(args: argparse.Namespace) -> int:
    recipes = build_matrix(_catalog(args), _options(args), args.releases)
    if args.json:
        print(json.dumps([r.to_json() for r in recipes], indent=2))
        return 0
    width = max(len(r.name) for r in recipes)
    for r in recipes:
        state = "" if r.buildable else f"  (not buildable: {r.problem})"
        print(f"{r.name.ljust(width)}  {r.kind.ljust(10)}  {r.image}{state}")
    return 0


def cmd_prepuller(args: argparse.Namespace) -> int:
    releases = select_releases(_catalog(args), args.releases)
    values = prepuller_values(releases, _options(args).plan_config)
    print(yaml.safe_dump(values, sort_keys=False), end="")
    return 0


def _tools(args: argparse.Namespace, probe_image: str | None = None) -> engine.Tools:
    return engine.detect_tools(
        builder=args.engine,
        runtime_flags=args.runtime_flags,
        containers_conf=args.containers_conf,
        isolation=args.isolation,
        ca_bundle=args.ca_bundle,
        probe_image=probe_image,
    )


def _of_kind(recipes: list[Recipe], kind: RecipeKind) -> Recipe:
    """Return the one recipe of ``kind`` in ``recipes``.

    ``kind`` is ``session-base`` or ``session``.
    """
    return next(r for r in recipes if r.kind == kind)


def selected_recipes(
    args: argparse.Namespace, recipes: list[Recipe], base: bool = False
) -> list[Recipe]:
    """Return the recipes named by --session, --release or --all, the session first.

    With ``base``, the session base comes before the session, since everything else is built on it.
    """
    every = getattr(args, "all", False)
    wanted = set(args.release or [])
    chosen = [r for r in recipes if r.release is not None and (every or r.name in wanted)]
    if args.session or chosen or every:
        kinds: tuple[RecipeKind, ...] = ("session-base", "session") if base else ("session",)
        chosen = [*(_of_kind(recipes, kind) for kind in kinds), *chosen]
    if not chosen:
        raise ImageBuildError("name what to build or test: --session, --release ID or --all.")
    return chosen


def cmd_build(args: argparse.Namespace) -> int:
    if args.sha256 and len(args.release or []) != 1:
        raise ImageBuildError("--sha256 needs exactly one --release.")
    tools = _tools(args)
    base = engine.local_base(tools, args.suite) if args.base == LOCAL_BASE else args.base
    if tools.image_id(base):
        tools = _tools(args, probe_image=base)
    options = _options(args, base)
    catalog = _catalog(args)
    if args.sha256:
        release = catalog.get(args.release[0])
        if release.tarball is None:
            raise ImageBuildError(f"{release.label} has no tarball, so --sha256 does not apply.")
        options = MatrixOptions(
            **{**options.__dict__, "checksums": {release.tarball.name: args.sha256.lower()}}
        )
    selected = selected_recipes(
        args, build_matrix(catalog, options, None if args.all else args.release), base=True
    )
    if args.all:
        selected = buildable(selected)
    with tempfile.TemporaryDirectory(prefix="casaspawner-wheel-") as tmp:
        wheel = engine.casaspawner_wheel(Path(tmp), args.casaspawner_wheel)
        for recipe in selected:
            print(f"building {recipe.image} ({recipe.kind}) ...", flush=True)
            result = engine.build(tools, recipe, wheel, force=args.force)
            verb = "up to date" if result.reused else f"built in {result.seconds:.0f} s"
            print(f"{recipe.image}: {verb} [input {result.input_hash[:12]}]", flush=True)
    return 0


def _built_tools(args: argparse.Namespace, recipes: list[Recipe]) -> engine.Tools:
    """Return the tools, probed with the first of ``recipes``.

    The probe runs once every one of ``recipes`` is known to be built.
    """
    tools = _tools(args)
    for recipe in recipes:
        if tools.image_id(recipe.image) is None:
            raise ImageBuildError(
                f"{recipe.image} is not built; run `casaspawner images build` first."
            )
    return _tools(args, probe_image=recipes[0].image)


def buildable(recipes: list[Recipe]) -> list[Recipe]:
    """Return the buildable recipes, and say which others are skipped, and why."""
    for recipe in recipes:
        if not recipe.buildable:
            print(f"skipping {recipe.name}: {recipe.problem}", flush=True)
    return [r for r in recipes if r.buildable]


def constraint_sources(args: argparse.Namespace, recipes: list[Recipe]) -> list[Recipe]:
    """Return the images whose install records pin what --session or --release name.

    For the session that is the session base: its venv is made there, and casaspawner's layer adds
    nothing to it. For a release it is the release's own image. Says which releases have nothing to
    pin.
    """
    named = [r for r in selected_recipes(args, recipes) if r.release is not None or args.session]
    sources = []
    for recipe in (_of_kind(recipes, "session-base") if r.kind == "session" else r for r in named):
        if recipe.kind == "monolithic" and not recipe.build_args.get("CASA_PYTHON"):
            casa = recipe.labels[f"{LABEL_PREFIX}.casa"]
            print(
                f"{recipe.name}: nothing to pin "
                f"(CASA {casa} has no Python 3, so pip installs nothing)"
            )
        else:
            sources.append(recipe)
    return sources


def cmd_constraints(args: argparse.Namespace) -> int:
    sources = constraint_sources(args, build_matrix(_catalog(args), _options(args), args.release))
    if not sources:
        return 0
    tools = _built_tools(args, sources)
    for recipe in sources:
        home = "/opt/session" if recipe.release is None else casa_home(recipe.release)
        freeze = f"{home}/casaspawner-freeze.txt"
        result = tools.run(
            tools.container(
                "run", "--rm", "--network", "none", "--entrypoint", "cat", recipe.image, freeze
            ),
            check=False,
        )
        if result.returncode != 0:
            raise ImageBuildError(
                f"{recipe.image} has no {freeze}; rebuild it with this casaspawner."
            )
        pins = sorted(
            {line.strip() for line in result.stdout.splitlines() if "==" in line}, key=str.lower
        )
        target = engine.constraints_path(recipe)
        command = "--session" if recipe.release is None else f"--release {recipe.name}"
        text = (
            f"# pip constraints of {recipe.name}: "
            "what its image installed; used by the next builds.\n"
            f"# Regenerate after a build with `casaspawner images constraints {command}`.\n"
        )
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text + "".join(f"{pin}\n" for pin in pins))
        except OSError as exc:
            raise ImageBuildError(f"cannot write {target}: {exc.strerror}.") from None
        print(f"{target}: {len(pins)} pins from {recipe.image}")
    return 0


def cmd_test(args: argparse.Namespace) -> int:
    options = _options(args)
    recipes = selected_recipes(args, build_matrix(_catalog(args), options, args.release))
    tools = _built_tools(args, recipes)
    report: dict[str, dict[str, object]] = {}
    failed = False
    for recipe in recipes:
        observed, problems = check_image(tools, recipe, args.measures)
        report[recipe.image] = {"observed": observed, "problems": problems}
        failed = failed or bool(problems)
        if not args.json:
            print(f"{recipe.image}: {'FAIL' if problems else 'ok'}")
            for problem in problems:
                print(f"  - {problem}")
    if args.json:
        print(json.dumps(report, indent=2))
    return 1 if failed else 0


def notices_problems(ext: dict[str, str]) -> list[str]:
    """Say what is wrong with casaspawner's notices in an image.

    ``ext`` comes from :func:`smoke.server_extensions`. The extension must import. The wheel's
    jupyter_server_config.d file, the only thing that enables it, must be there and in effect. The
    JupyterLab extension must be installed and valid.
    """
    notices, lab = smoke.NOTICES_EXTENSION, smoke.NOTICES_LABEXTENSION
    problems = []
    if ext.get(f"{notices} (import)") != "ok":
        problems.append(f"{notices} does not import in the session environment")
    if not ext.get(f"{notices} (config)"):
        problems.append(
            f"no jupyter_server_config.d file of the session environment enables {notices}"
        )
    if ext.get(notices) != "enabled":
        problems.append(f"jupyter server extension list does not show {notices} enabled")
    if not ext.get(f"{lab} (path)"):
        problems.append(
            f"the JupyterLab extension {lab} is not in /opt/session/share/jupyter/labextensions"
        )
    if ext.get(f"{lab} (labextension)") != "enabled OK":
        state = ext.get(f"{lab} (labextension)") or "not listed"
        problems.append(f"jupyter labextension list does not show {lab} enabled and OK ({state})")
    return problems


def check_image(
    tools: engine.Tools, recipe: Recipe, measures: Path | None
) -> tuple[dict[str, object], list[str]]:
    """Run every smoke check that applies to ``recipe``.

    Returns the observations and the problems found.
    """
    session = smoke.Session(home=smoke.home_dir(), measures=measures)
    observed: dict[str, object] = {}
    problems: list[str] = []
    observed["world_writable"] = ww = smoke.world_writable(tools, recipe.image)
    if ww:
        problems.append(f"world-writable outside /tmp: {', '.join(ww[:5])}")
    observed["identity"] = ident = smoke.identity(tools, recipe.image, session)
    if ident.get("user") != "smoke" or ident.get("home") != smoke.HOME:
        problems.append(f"uid {session.uid} got no passwd entry or HOME: {ident}")
    xstartup = PlanConfig().desktop_xstartup
    observed["desktop"] = desk = smoke.desktop_tools(tools, recipe.image, session, xstartup)
    if not desk["vncserver"]:
        problems.append("vncserver is missing")
    if not desk["xstartup"]:
        problems.append(f"the desktop start script {xstartup} is missing")
    observed["server_extensions"] = ext = smoke.server_extensions(tools, recipe.image, session)
    problems += notices_problems(ext)
    observed["vnc"] = greeting = smoke.vnc_greeting(tools, recipe.image, session)
    if not greeting.startswith("RFB "):
        problems.append(f"TigerVNC did not answer on its Unix socket: {greeting[-300:]}")
    specs = smoke.kernelspecs(tools, recipe.image, session)
    with smoke.jupyter_server(tools, recipe.image, session) as (url, token):
        observed["jupyter"] = smoke.get_json(f"{url}/api/status", token)
        observed["default_kernel"] = smoke.get_json(f"{url}/api/kernelspecs", token).get("default")
        observed["desktop_page"] = smoke.get_status(f"{url}/desktop/", token)
        observed["desktop_vnc"] = smoke.desktop_greeting(url, token)
    if observed["desktop_page"] != 200:
        problems.append(f"/desktop/ answered {observed['desktop_page']}")
    if observed["desktop_vnc"] != "RFB 003.008":
        problems.append(
            f"the desktop websocket did not reach TigerVNC: {observed['desktop_vnc']!r}"
        )
    if recipe.release is not None:
        release = recipe.release
        names = {spec["spec"]["display_name"]: name for name, spec in specs.items()}
        observed["kernels"] = sorted(names)
        kernel = names.get(release.kernel_name)
        if kernel is None:
            problems.append(f"no kernel named {release.kernel_name!r} (found {sorted(names)})")
        else:
            if observed["default_kernel"] != kernel:
                problems.append(
                    f"the default kernel is {observed['default_kernel']!r}, not {kernel!r}"
                )
            if measures is None:
                problems.append("no --measures given, so the CASA kernel and plotms were not run")
            else:
                reply = smoke.run_kernel(tools, recipe.image, session, kernel, smoke.CASA_CODE)
                observed["kernel_run"] = reply
                if reply["status"] != "ok" or f"casatools {release.casa}" not in reply["output"]:
                    problems.append(f"the CASA kernel failed: {reply['output'][-300:]}")
        # CASA 6: the GUI tasks are Python's.
        if measures is not None and release.casa_version.major >= 6:
            observed["plotms"] = plot = smoke.plotms_plot(tools, recipe.image, session)
            if plot["png"] is None:
                problems.append(f"plotms wrote no PNG of a simulated MS: {plot['log'][-400:]}")
            elif plot["png"]["blue"] < 1000:
                problems.append(f"plotms drew no data points: {plot['png']}")
            if plot["viewer"] != "ok":
                problems.append(f"casaviewer's tasks do not import: {plot['viewer']}")
        observed["casa_env"] = env = smoke.casa_environment(tools, recipe.image, session)
        if not env["version"]:
            problems.append(f"CASASPAWNER_CASA_PYTHON {env['python']!r} does not run")
    return observed, problems

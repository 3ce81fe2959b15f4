"""``casaspawner envs``: see and prepare the local CASA environments.

Preparing them ahead means no user waits for a first build.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

from casaspawner.catalog.model import load_catalog
from casaspawner.local.environments.manager import EnvironmentManager
from casaspawner.runtime import cache_dir


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``envs list`` and ``envs build`` to the ``casaspawner`` command line."""
    envs = subparsers.add_parser(
        "envs", help="list and build the local per-release CASA environments"
    )
    sub = envs.add_subparsers(
        dest="envs_command", required=True, metavar="ACTION", parser_class=type(envs)
    )
    p = sub.add_parser(
        "list", help="which releases are built, can be built here, or cannot (and why)"
    )
    _options(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_list)
    p = sub.add_parser("build", help="build the environment of a release now (progress on stdout)")
    _options(p)
    p.add_argument("release", help="catalog id, e.g. casa-6.6.5-31")
    p.set_defaults(func=cmd_build)


def _options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cache-dir", type=Path, default=None, help=f"environments cache (default {cache_dir()})"
    )
    p.add_argument(
        "--tarball-mirror", default=None, help="base URL to fetch monolithic tarballs from"
    )
    p.add_argument(
        "--probe-timeout", type=float, default=5.0, help="seconds to wait for a tarball to answer"
    )
    p.add_argument(
        "--catalog", default=None, help="catalog file instead of the bundled releases.yaml"
    )


def _manager(args: argparse.Namespace) -> EnvironmentManager:
    return EnvironmentManager(
        args.cache_dir, tarball_mirror=args.tarball_mirror, probe_timeout=args.probe_timeout
    )


def cmd_list(args: argparse.Namespace) -> int:
    manager = _manager(args)
    rows = []
    for release in load_catalog(args.catalog).available():
        env = manager.ready(release)
        reason = None if env else manager.unavailable_reason(release)
        status = "ready" if env else ("buildable" if reason is None else "unavailable")
        rows.append(
            {
                "id": release.id,
                "label": release.label,
                "status": status,
                "reason": reason,
                "path": str(env.root) if env else None,
            }
        )
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        for row in rows:
            print(f"{row['id']:28} {row['status']:12} {row['reason'] or row['path'] or ''}")
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    # An unknown id is one sentence and exit status 2.
    release = load_catalog(args.catalog).get(args.release)

    async def build() -> None:
        async for message in _manager(args).ensure(release):
            print(message, flush=True)

    asyncio.run(build())
    env = _manager(args).ready(release)
    print(f"{release.label}: {env.root if env else 'not built'}")
    return 0 if env else 2

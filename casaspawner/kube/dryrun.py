"""``casaspawner pod``: print what CASASpawner would submit, with no cluster.

That is the session's pod. The dry run builds a real ``CASASpawner``
from the hub's config file and runs what a spawn runs, in JupyterHub's order:
``auth_state_hook`` → ``group_overrides`` → ``apply_user_options`` (options → identity →
resolution → plan) → ``pre_spawn_hook`` → ``load_user_options`` (profile, then plan) →
``get_pod_manifest`` → ``modify_pod_hook`` (then the Pod Security check). Only the dataset is
read directly from this machine, and the login is replaced by ``--uid/--gid/--group`` (the groups
are also the user's JupyterHub groups, for ``group_overrides``). Not run:
``Authenticator.pre_spawn_start`` (there is no authenticator) and everything after the pod
exists. Values JupyterHub itself supplies at spawn time (API URL and tokens) are placeholders.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from casaspawner.errors import CasaspawnerError, InvalidInput, shown
from casaspawner.session.identity import project_groups

#: Stands in for the user's access token so the token directory appears; it is never printed.
PLACEHOLDER_TOKEN = "dry-run-placeholder"  # noqa: S105
_OFFLINE_KUBECONFIG = """\
apiVersion: v1
kind: Config
clusters: [{name: dry-run, cluster: {server: "https://127.0.0.1:9"}}]
users: [{name: dry-run, user: {}}]
contexts: [{name: dry-run, context: {cluster: dry-run, user: dry-run}}]
current-context: dry-run
"""


def register(subparsers: Any) -> None:
    """Add ``pod`` to the ``casaspawner`` command line."""
    p = subparsers.add_parser(
        "pod", help="print the pod manifest CASASpawner would submit (dry run, no cluster)"
    )
    p.add_argument("--user", required=True, metavar="NAME", help="JupyterHub user name")
    p.add_argument("--uid", required=True, type=int, metavar="N", help="numeric user id (never 0)")
    p.add_argument("--gid", required=True, type=int, metavar="N", help="numeric primary group id")
    p.add_argument(
        "--group",
        action="append",
        default=[],
        metavar="G",
        help="a group of the user (repeatable; one project each)",
    )
    p.add_argument(
        "--dataset",
        required=True,
        metavar="TARGET",
        help="a dataset directory on this machine (read directly), or an ALMA uid or project code",
    )
    p.add_argument(
        "--interface", choices=("lab", "desktop"), default="lab", help="session interface"
    )
    p.add_argument("--size", help="session size (a key of CASASpawner.session_sizes)")
    p.add_argument("--release", help="override the resolved CASA release (a catalog id)")
    p.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="the hub's jupyterhub_config.py (or a .json config)",
    )
    p.add_argument(
        "--no-token",
        action="store_true",
        help="as for a user without an access token (no token directory)",
    )
    p.add_argument(
        "--archive-url",
        default=os.environ.get("CASASPAWNER_ARCHIVE_URL", "https://almascience.org"),
        help=(
            "ALMA archive for identifiers, unless the config sets archive_client "
            "(default: %(default)s)"
        ),
    )
    p.add_argument(
        "--json", action="store_true", help="print a JSON v1 List instead of YAML documents"
    )
    p.set_defaults(func=cmd_pod)


def cmd_pod(args: argparse.Namespace) -> int:
    manifests = asyncio.run(_manifests(args))
    if args.json:
        print(json.dumps({"apiVersion": "v1", "kind": "List", "items": manifests}, indent=2))
    else:
        sys.stdout.write(yaml.safe_dump_all(manifests, sort_keys=False, default_flow_style=False))
    return 0


def _load_config(path: Path | None) -> Any:
    from traitlets.config import Config
    from traitlets.config.loader import JSONFileConfigLoader, PyFileConfigLoader

    if path is None:
        return Config()
    if not path.is_file():
        raise InvalidInput(f"The config file {path} does not exist.")
    loader_class = JSONFileConfigLoader if path.suffix == ".json" else PyFileConfigLoader
    try:
        return loader_class(path.name, str(path.parent)).load_config()
    # A config file can raise anything: say which file, in one line.
    except Exception as exc:
        detail = " ".join(str(exc).split())[:200]
        raise InvalidInput(
            f"The config file {path} could not be loaded ({type(exc).__name__}: {detail})."
        ) from None


@contextmanager
def _offline_kubernetes() -> Iterator[None]:
    """Let KubeSpawner construct itself without a cluster.

    It gets a placeholder kubeconfig it never contacts.
    """
    from kubernetes_asyncio.config import kube_config
    from kubespawner.clients import load_config

    previous = kube_config.KUBE_CONFIG_DEFAULT_LOCATION
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kubeconfig"
        path.write_text(_OFFLINE_KUBECONFIG)
        kube_config.KUBE_CONFIG_DEFAULT_LOCATION = str(path)
        load_config.cache_clear()
        try:
            yield
        finally:
            kube_config.KUBE_CONFIG_DEFAULT_LOCATION = previous
            load_config.cache_clear()


class _DryRunGroup:
    def __init__(self, name: str) -> None:
        self.name = name


class _DryRunUser:
    """The parts of a JupyterHub user a spawner reads."""

    def __init__(
        self, name: str, auth_state: dict[str, Any], groups: list[str] | None = None
    ) -> None:
        self.name = name
        self.id = 0
        self.url = f"/user/{name}/"
        self.groups: list[Any] = [_DryRunGroup(g) for g in groups or []]
        self._auth_state = auth_state

    async def get_auth_state(self) -> dict[str, Any]:
        return self._auth_state


def _put(target: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        target = target.setdefault(part, {})
    target[last] = value


async def _manifests(args: argparse.Namespace) -> list[dict[str, Any]]:
    from tornado import web

    from casaspawner.datasets.archive import AlmaDataLinkClient
    from casaspawner.kube.spawner import CASASpawner
    from casaspawner.session.readers import LocalDirectoryReader

    if args.uid == 0:
        raise InvalidInput("Sessions never run as root; give a --uid other than 0.")
    config = _load_config(args.config)
    with _offline_kubernetes():
        try:
            spawner = CASASpawner(
                _mock=True, user=_DryRunUser(args.user, {}, args.group), config=config
            )
        except CasaspawnerError:
            raise
        except Exception as exc:
            raise InvalidInput(
                f"The spawner could not be configured ({type(exc).__name__}: {exc})."
            ) from None
        auth_state: dict[str, Any] = {}
        _put(auth_state, spawner.uid_claim, args.uid)
        _put(auth_state, spawner.gid_claim, args.gid)
        _put(auth_state, spawner.groups_claim, list(args.group))
        if not args.no_token:
            _put(auth_state, spawner.access_token_claim, PLACEHOLDER_TOKEN)
        spawner.user._auth_state = auth_state
        # --uid, --gid and --group stand in for the login.
        spawner.identity_hook = None  # type: ignore[assignment]
        spawner.dataset_reader = LocalDirectoryReader()
        if spawner.archive_client is None:
            spawner.archive_client = AlmaDataLinkClient(args.archive_url)
        options = {"dataset": args.dataset, "interface": args.interface}
        if args.size:
            options["size"] = args.size
        if args.release:
            options["release"] = args.release
        spawner.user_options = options
        try:
            pod = await spawner.dry_run_manifests()
        # A SpawnException: one sentence for the user.
        except web.HTTPError as exc:
            raise InvalidInput(
                getattr(exc, "jupyterhub_message", None) or exc.log_message or str(exc)
            ) from None
        # For example a trait a hook set to a value it does not take.
        except Exception as exc:
            detail = " ".join(str(exc).split())[:200]
            raise InvalidInput(
                "The pod could not be built with this configuration "
                f"({type(exc).__name__}: {detail})."
            ) from None
    usable, _ = project_groups(args.group, spawner.project_group_pattern)
    unused = [group for group in args.group if group.lstrip("/") not in usable]
    # A login with these groups gets no project directory for them either: say so, go on.
    if unused:
        groups = ", ".join(repr(shown(g)) for g in unused)
        print(
            f"casaspawner: note: no project directory for --group {groups}: a project group's "
            "name matches CASASpawner.project_group_pattern and can be a directory name.",
            file=sys.stderr,
        )
    return [pod]

"""Properties of the whole spawn-option and identity surface, over generated input.

Whatever a user or a login sends: either a result inside the rules (never root, never a path
outside the user's own storage, never a pod outside the restricted profile), or one short
sentence. Never another exception, never a traceback.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from support.session import Backend

from casaspawner.catalog.model import load_catalog
from casaspawner.datasets.model import Resolution
from casaspawner.datasets.resolve import resolve_path
from casaspawner.datasets.synth import write_dataset
from casaspawner.errors import ArchiveUnavailable, CasaspawnerError
from casaspawner.kube.objects import PodSettings, session_fields
from casaspawner.kube.podsecurity import pod_security_violations
from casaspawner.plan import MAX_ID, Identity, PlanConfig, StorageLayout
from casaspawner.session.identity import identity_from_login
from casaspawner.session.options import parse_options
from casaspawner.session.prepare import prepare
from casaspawner.session.readers import DatasetReader, StorageMountReader, locate_in_storage
from casaspawner.session.settings import SessionSettings

CATALOG = load_catalog()
SETTINGS = SessionSettings(catalog=CATALOG, plan=PlanConfig(), default_size="medium")
#: Anything JSON can carry, as a login's claims or a REST request's options do.
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=300),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=20), inner, max_size=4)
    ),
    max_leaves=12,
)
TEXT = st.text(max_size=2000) | st.sampled_from(["", "~", "..", "/", "lab", "desktop", "medium"])
OPTIONS = st.dictionaries(
    st.sampled_from(["dataset", "interface", "size", "release", "profile", "casaspawner", "x"]),
    TEXT | JSON,
    max_size=5,
)


def one_sentence(exc: BaseException) -> None:
    assert isinstance(exc, CasaspawnerError), repr(exc)
    text = str(exc)
    assert text and "\n" not in text and "Traceback" not in text
    assert len(text) < 1000, len(text)


@given(OPTIONS | JSON)
@settings(max_examples=300, deadline=None)
def test_any_options_parse_or_give_one_sentence(options: Any) -> None:
    try:
        parsed = parse_options(options, SETTINGS)
    except Exception as exc:
        one_sentence(exc)
        return
    assert parsed.interface in ("lab", "desktop")
    assert parsed.size in SETTINGS.plan.sizes
    assert parsed.release is None or parsed.release in CATALOG


@given(
    name=st.from_regex(r"[a-z][a-z0-9._@-]{0,20}", fullmatch=True),
    uid=JSON,
    gid=JSON,
    groups=JSON,
    gids=JSON,
    root_group=st.booleans(),
)
@settings(max_examples=400, deadline=None)
def test_any_login_gives_a_non_root_identity_or_one_sentence(
    name: str, uid: Any, gid: Any, groups: Any, gids: Any, root_group: bool
) -> None:
    try:
        identity, _ = identity_from_login(
            name,
            uid=uid,
            gid=gid,
            groups=groups,
            supplemental_gids=gids,
            allow_root_group=root_group,
        )
    except Exception as exc:
        one_sentence(exc)
        return
    assert 0 < identity.uid <= MAX_ID and 0 <= identity.gid <= MAX_ID
    if not root_group:
        assert identity.gid != 0 and 0 not in identity.supplemental_gids


IDENTITY = Identity("alice", 1000, 1000, ("proja", "projb"))
MOUNTS = [
    PurePosixPath("/arc/home/alice"),
    *(PurePosixPath(f"/arc/projects/{g}") for g in IDENTITY.groups),
]


@given(TEXT)
@settings(max_examples=500, deadline=None)
def test_any_path_stays_inside_the_users_storage_or_gives_one_sentence(text: str) -> None:
    try:
        root, relative = locate_in_storage(text, IDENTITY, StorageLayout())
    except Exception as exc:
        one_sentence(exc)
        return
    assert ".." not in relative.parts and not relative.is_absolute()
    assert PurePosixPath(root.mount) in MOUNTS
    assert root.sub_path in ("home/alice", "projects/proja", "projects/projb")


class StorageBackend(Backend):
    """The plain backend, reading datasets from a storage root as a hub's mount does."""

    root: Path = Path("/nonexistent")

    def get_dataset_reader(self) -> DatasetReader | None:
        return StorageMountReader(self.root, StorageLayout())

    async def read_dataset(self, target: Path | str, label: str, identity: Identity) -> Resolution:
        # In a thread of this process, for speed over many inputs: the worker process that
        # spawners use is tested on its own (tests/unit/test_resolve_worker.py).
        if isinstance(target, str):
            raise ArchiveUnavailable(f"No ALMA archive is configured to look up {target[:40]}.")
        return await asyncio.to_thread(resolve_path, target, self.catalog, label=label)


@pytest.fixture(scope="module")
def storage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A storage root whose home of alice holds a Cycle 10 dataset, ``~/2023.1.00026.S``."""
    root = tmp_path_factory.mktemp("arc")
    write_dataset(root / "home" / "alice", era="cycle10")
    return root


@given(
    options=OPTIONS,
    dataset=st.sampled_from(["~/2023.1.00026.S", "2023.1.00026.S", "~", "/arc/home/alice"]),
    uid=st.integers(1, MAX_ID),
    gids=st.lists(st.integers(1, MAX_ID), max_size=3),
)
@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_any_request_gives_a_restricted_pod_or_one_sentence(
    options: dict[str, Any], dataset: str, uid: int, gids: list[int], storage: Path
) -> None:
    # Half the requests name the real dataset, so that most of them get as far as a pod.
    if options.get("dataset") in (None, "", "~"):
        options = {**options, "dataset": dataset}
    backend = StorageBackend(CATALOG)
    backend.root = storage
    try:
        plan = asyncio.run(prepare(options, SETTINGS, backend))
    except Exception as exc:
        event(f"refused: {type(exc).__name__}")
        one_sentence(exc)
        return
    event("a pod")
    plan = dataclasses.replace(plan, identity=Identity("alice", uid, uid, (), tuple(gids)))
    fields = session_fields(
        plan, PodSettings(token_url="http://hub:8081/hub/api/casa-token/alice/")
    )
    container = {
        "name": "notebook",
        "image": fields["image"],
        "securityContext": fields["container_security_context"],
        "volumeMounts": list(fields["volume_mounts"].values()),
    }
    pod = {
        "metadata": {"labels": fields["extra_labels"], "annotations": fields["extra_annotations"]},
        "spec": {
            "securityContext": fields["pod_security_context"],
            "containers": [container],
            "volumes": list(fields["volumes"].values()),
            "automountServiceAccountToken": fields["automount_service_account_token"],
        },
    }
    assert pod_security_violations(pod, "restricted") == []
    assert all(Path(m["mountPath"]).is_absolute() for m in container["volumeMounts"])

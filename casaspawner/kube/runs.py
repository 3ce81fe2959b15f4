"""``casaspawner run --kubernetes``: a headless run as a Kubernetes Job, followed to its end.

The operator's (or an in-cluster service's) path: the dataset is read through a mount of the
whole storage here (``--storage-path``, as ``CASASpawner.storage_hub_path``), resolved with the
same code as ``casaspawner run`` on one machine, planned as a session of the user named by
``--user/--uid/--gid`` would be, and run as the Job :func:`casaspawner.kube.jobs.run_job`
builds. The command then prints the pod's log until the run ends and says how it ended in one
sentence, with ``casaspawner run``'s exit statuses: 0 finished, 1 failed, 3 lost (the pod ended
without a result: deleted, or its node lost), 130 stopped (Ctrl-C, or ``--stop``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import secrets
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from casaspawner.catalog.model import Catalog, load_catalog
from casaspawner.datasets.model import Resolution
from casaspawner.datasets.storage import STORAGE
from casaspawner.datasets.tree import open_directory, open_file
from casaspawner.errors import CasaspawnerError, ConfigurationError, InvalidInput, shown
from casaspawner.kube import jobs
from casaspawner.kube.objects import PodSettings
from casaspawner.kube.podsecurity import pod_security_sentence, pod_security_violations
from casaspawner.plan import (
    DEFAULT_SIZES,
    Identity,
    PlanConfig,
    Resources,
    SessionOptions,
    SessionPlan,
    StorageLayout,
    chosen_release,
    make_plan,
    with_measures,
)
from casaspawner.runtime import RECORD_FILE, RECORD_RUNTIME_ID, RUN_IMAGE_URL_ENV, record_text
from casaspawner.session.config import sizes as config_sizes
from casaspawner.session.identity import identity_from_login
from casaspawner.session.measures import measures_for
from casaspawner.session.readers import StorageMountReader, locate_in_storage
from casaspawner.session.record import (
    RecordFacts,
    Runtime,
    image_digest,
    run_record,
)
from casaspawner.session.runs import (
    EXIT_FAILED,
    EXIT_STOPPED,
    RUN_FILE,
    RUNS_DIR,
    ending,
    resolve,
    run_name,
)

#: The label every run's Job and pod carry.
COMPONENT = {
    "app.kubernetes.io/component": "casa-run",
    "app.kubernetes.io/managed-by": "casaspawner",
}
#: Annotations naming the run, relative to the plan's label prefix.
RUN_ID, RUN_DIR, RUN_STORAGE, RUN_SCRIPT = "run-id", "run-dir", "run-storage-path", "run-script"
#: An annotation only this command's Job has: a Job of that name there already may be it.
RUN_NONCE = "run-nonce"
#: What the command does in the run's namespace: a Role's rules (docs/headless.md shows them).
ROLE_RULES: list[dict[str, list[str]]] = [
    {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["create", "get", "delete"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]},
    {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
]
#: Container waiting reasons that never get better by themselves. ``ErrImagePull`` is not one:
#: a registry's hiccup is tried again, and only the back-off after it is hopeless (as a session's).
HOPELESS = frozenset(
    {
        "ImagePullBackOff",
        "InvalidImageName",
        "CreateContainerConfigError",
        "CreateContainerError",
        "RunContainerError",
    }
)
#: Seconds between looks at the Job and its pod.
POLL = 1.0
#: Seconds the command waits for an API server that does not answer.
PATIENCE = 300.0
#: Seconds the rest of an ended run's log may take to arrive.
LOG_WAIT = 30.0
#: Seconds ``--stop`` waits for the pod to go.
STOP_WAIT = jobs.GRACE_SECONDS + 30
#: The most of a run's file read here: it is a few kilobytes.
RUN_FILE_LIMIT = 1 << 20


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the Kubernetes options to ``casaspawner run``."""
    group = p.add_argument_group("on Kubernetes (an operator's path; see docs/headless.md)")
    group.add_argument(
        "--kubernetes",
        action="store_true",
        help="run as a Kubernetes Job (with --follow and --stop: a run's Job name)",
    )
    group.add_argument("--namespace", help="the Job's namespace (default: the context's)")
    group.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, in-cluster)")
    group.add_argument("--user", metavar="NAME", help="the user the run runs as")
    group.add_argument("--uid", type=int, metavar="N", help="the user's numeric id (never 0)")
    group.add_argument("--gid", type=int, metavar="N", help="the user's primary group id")
    group.add_argument(
        "--group",
        action="append",
        default=[],
        metavar="G",
        help="a project group of the user (repeatable; mounted as in a session)",
    )
    group.add_argument(
        "--supplemental-gid",
        action="append",
        type=int,
        default=[],
        metavar="N",
        help="a supplemental group id of the user (repeatable)",
    )
    group.add_argument(
        "--storage-path",
        type=Path,
        default=os.environ.get("CASA_STORAGE_HUB_PATH") or None,
        metavar="DIR",
        help="the storage (Cavern) root mounted here, holding home/ and projects/ "
        "(default: $CASA_STORAGE_HUB_PATH)",
    )
    group.add_argument(
        "--measures-path",
        type=Path,
        default=os.environ.get("CASA_MEASURES_VERSIONS_PATH") or None,
        metavar="DIR",
        help="the measures volume mounted here, when it keeps one directory per version (as "
        "CASASpawner.measures_versions_hub_path): the run reads the newest (default: "
        "$CASA_MEASURES_VERSIONS_PATH; unset: the volume is one tree, mounted whole)",
    )
    group.add_argument(
        "--image-registry",
        default=os.environ.get("CASASPAWNER_IMAGE_REGISTRY") or PlanConfig.image_registry,
        metavar="REGISTRY",
        help="where the CASA images are (default: $CASASPAWNER_IMAGE_REGISTRY, else %(default)s)",
    )
    group.add_argument(
        "--sizes",
        type=Path,
        metavar="FILE",
        help="the hub's session sizes, as YAML or JSON: CASASpawner.session_sizes' mapping of "
        "each size to cpu_guarantee, cpu_limit, mem_guarantee, mem_limit (default: the "
        "built-in small, medium and large)",
    )
    group.add_argument(
        "--deadline",
        type=int,
        default=jobs.DEFAULT_DEADLINE,
        metavar="SECONDS",
        help="stop the run after this long (the Job's activeDeadlineSeconds; default: a day)",
    )
    group.add_argument(
        "--ttl",
        type=int,
        default=jobs.DEFAULT_TTL,
        metavar="SECONDS",
        help="delete the finished Job after this long (default: an hour)",
    )


def cmd_run_kube(args: argparse.Namespace) -> int:
    """``casaspawner run --kubernetes``: submit, follow or stop a run's Job."""
    for option in ("approximate", "cache_dir"):
        if getattr(args, option, None):
            flag = "--" + option.replace("_", "-")
            raise InvalidInput(f"{flag} is for runs on this machine, not on Kubernetes.")
    return asyncio.run(_command(args))


async def _command(args: argparse.Namespace) -> int:
    if args.follow or args.stop:
        async with cluster(args) as kube:
            if args.stop:
                return await kube.stop(args.stop)
            return await kube.follow(args.follow)
    async with cluster(args) as kube:
        job = await submission(args)
        # Two runs of one script in one second: the second is the run's next number.
        for number in range(2, 100):
            if await kube.create(job):
                break
            job = await submission(args, number)
        else:
            raise InvalidInput("Too many runs of this script this second; try again.")
        meta = job["metadata"]
        script = annotation(meta["annotations"], RUN_SCRIPT) or "the script"
        image = job["spec"]["template"]["spec"]["containers"][0]["image"]
        print(
            f"casaspawner: Job {meta['name']} in namespace {kube.namespace} runs {script} "
            f"in {image}",
            file=sys.stderr,
            flush=True,
        )
        if args.detach:
            print(meta["name"])
            return 0
        return await kube.follow(meta["name"])


# The run: from the command line to a Job, reading the dataset through the storage mount
async def submission(args: argparse.Namespace, first: int = 1) -> dict[str, Any]:
    """The Job of the run the command line asks for; every refusal is one sentence.

    The run's id is the first of number ``first`` and after not in the runs directory.
    """
    if not args.dataset:
        raise InvalidInput("Give the dataset with --dataset, as on the spawn form.")
    if not args.command:
        raise InvalidInput("Give the script to run after --, e.g. -- scriptForPI.py.")
    if not args.user or args.uid is None or args.gid is None:
        raise InvalidInput("On Kubernetes, give the user the run runs as: --user, --uid, --gid.")
    if args.storage_path is None or not Path(args.storage_path).is_dir():
        raise InvalidInput(
            "On Kubernetes, give --storage-path: the storage root mounted here, holding home/ "
            "and projects/."
        )
    sizes = operator_sizes(args.sizes) if args.sizes is not None else dict(DEFAULT_SIZES)
    size = args.size or ("medium" if "medium" in sizes else next(iter(sizes)))
    if size not in sizes:
        raise InvalidInput(
            f"{shown(size)!r} is not a session size; choose one of {', '.join(sizes)}."
        )
    if args.deadline <= 0 or args.ttl < 0:
        raise InvalidInput("--deadline must be above 0 seconds and --ttl at least 0.")
    catalog = load_catalog(args.catalog) if args.catalog else load_catalog()
    if args.release is not None:
        chosen_release(catalog, args.release)
    # As a session's: never uid 0, never gid 0 (primary or supplemental).
    identity, skipped = identity_from_login(
        args.user,
        uid=args.uid,
        gid=args.gid,
        groups=list(args.group),
        supplemental_gids=list(args.supplemental_gid),
        allow_root_group=False,
    )
    if skipped:
        raise InvalidInput(f"The group {shown(skipped[0])!r} cannot be a project directory.")
    layout = StorageLayout()
    storage = Path(args.storage_path)
    reader = StorageMountReader(storage, layout)
    async with reader.open(args.dataset, identity) as directory:
        root, relative = locate_in_storage(args.dataset, identity, layout)
        dataset = PurePosixPath(root.mount) / relative
        resolution = dataclasses.replace(resolve(args, catalog, directory), dataset=str(dataset))
        script, digest = await find_script(
            args.command[0], directory, dataset, resolution, reader, identity, layout
        )
    options = SessionOptions(dataset=args.dataset, size=size, release=args.release)
    config = PlanConfig(image_registry=args.image_registry, sizes=sizes)
    plan = make_plan(identity, options, catalog, resolution, config)
    if args.measures_path is not None:
        try:
            plan = with_measures(plan, measures_for(args.measures_path))
        except ConfigurationError:
            raise InvalidInput(
                f"--measures-path {shown(str(args.measures_path))} holds no measures version "
                "this command can read (one directory per version)."
            ) from None
    started = datetime.now(timezone.utc)
    runs = runs_directory(args.runs_dir, dataset, identity, layout)
    runs_root, runs_relative = locate_in_storage(str(runs), identity, layout)
    runs_here = storage / runs_root.sub_path / runs_relative
    run_id = next(
        name
        for number in range(first, 100)
        if not os.path.lexists(runs_here / (name := run_name(script.name, started, number)))
    )
    run_dir = runs / run_id
    return job_for(
        plan,
        catalog,
        script=script,
        digest=digest,
        arguments=args.command[1:],
        started=started,
        run_id=run_id,
        run_dir=run_dir,
        storage_path=PurePosixPath(runs_root.sub_path) / runs_relative / run_id,
        deadline=args.deadline,
        ttl=args.ttl,
    )


def operator_sizes(path: Path) -> dict[str, Resources]:
    """The session sizes in ``path`` (YAML or JSON, as ``CASASpawner.session_sizes``).

    A file that cannot be read, or sizes that cannot work, is one sentence.
    """
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        raise InvalidInput(f"--sizes {shown(str(path))} cannot be read: {reason}.") from None
    if not isinstance(raw, dict):
        raise InvalidInput(f"--sizes {shown(str(path))} must map each size to its resources.")
    try:
        return config_sizes(raw, f"--sizes {shown(str(path))}")
    except ConfigurationError as exc:
        # The operator's own file: the sentence without "the hub's configuration".
        raise InvalidInput(str(exc).split(": ", 1)[-1]) from None


async def find_script(
    name: str,
    directory: Path,
    dataset: PurePosixPath,
    resolution: Resolution,
    reader: StorageMountReader,
    identity: Identity,
    layout: StorageLayout,
) -> tuple[PurePosixPath, str]:
    """The script, in the user's storage: its path in the pod, and its SHA-256.

    A path (``~/…``, ``/arc/…``) is taken as in the session; a name is looked for in the
    dataset, in its ``script/`` directory and beside the evidence, as on one machine. The hub
    never follows the user's links to it: its directory is walked as the dataset's is, and the
    script itself is opened without following a link, as a regular file, and hashed from there.
    """
    missing = InvalidInput(
        f"There is no script {shown(name)} in the user's storage: give its path there "
        "(~/… or /arc/…), or a name in the dataset or its script directory."
    )
    if name.startswith(("~", "/")):
        root, relative = locate_in_storage(name, identity, layout)
        if not relative.name:
            raise missing
        parent = str(PurePosixPath(root.mount) / relative.parent)
        unreadable: InvalidInput | None = None
        try:
            async with reader.open(parent, identity) as there:
                try:
                    digest = await _digest(reader, name, there, PurePosixPath(relative.name))
                except InvalidInput as exc:
                    unreadable, digest = exc, None
        except InvalidInput:
            # No such directory, or one out of the user's storage through a link.
            raise missing from None
        if unreadable is not None:
            raise unreadable
        if digest is not None:
            return PurePosixPath(root.mount) / relative, digest
    else:
        given = PurePosixPath(name)
        if ".." in given.parts or given.is_absolute():
            raise InvalidInput(f"The script {shown(name)} may not contain '..'.")
        candidates = [given, "script" / given]
        evidence = resolution.evidence.path.partition("!")[0]
        if evidence:
            candidates.append(PurePosixPath(evidence).parent / given)
        for candidate in candidates:
            digest = await _digest(reader, name, directory, candidate)
            if digest is not None:
                return dataset / candidate, digest
    raise missing


async def _digest(
    reader: StorageMountReader, name: str, directory: Path, relative: PurePosixPath
) -> str | None:
    """:func:`script_digest` from the hub's storage threads, within the reader's deadline."""
    read = functools.partial(script_digest, name, directory, relative)
    return await STORAGE.call(read, deadline=reader.deadline, what=f"the script {shown(name)!r}")


def script_digest(name: str, directory: Path, relative: PurePosixPath) -> str | None:
    """The SHA-256 of the regular file ``relative`` below ``directory``, read in chunks.

    None when a step is a link, missing or not a directory, or the file is not a regular one (a
    FIFO does not block).
    """
    digest = hashlib.sha256()
    try:
        with open_directory(directory) as base, open_file(base, relative) as handle:
            if handle is None:
                return None
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    except (OSError, ValueError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise InvalidInput(f"The script {shown(name)} cannot be read ({why}).") from None
    return digest.hexdigest()


def runs_directory(
    given: Path | None, dataset: PurePosixPath, identity: Identity, layout: StorageLayout
) -> PurePosixPath:
    """Where the run's directory goes, in the pod: ``--runs-dir``, else beside the dataset."""
    if given is None:
        return dataset / RUNS_DIR
    root, relative = locate_in_storage(str(given), identity, layout)
    return PurePosixPath(root.mount) / relative


def job_for(
    plan: SessionPlan,
    catalog: Catalog,
    *,
    script: PurePosixPath,
    digest: str,
    arguments: list[str],
    started: datetime,
    run_id: str,
    run_dir: PurePosixPath,
    storage_path: PurePosixPath,
    deadline: int,
    ttl: int,
    settings: PodSettings | None = None,
    labels: Mapping[str, str] | None = None,
    annotations: Mapping[str, str] | None = None,
    environment: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The run's Job, its record and annotations, checked against the Pod Security level.

    ``settings`` are the pod's (a spawner's volumes and level; without, the defaults' and the
    restricted level); ``labels``, ``annotations`` and ``environment`` are added to the run's
    own.
    """
    facts = RecordFacts(
        started,
        Runtime("image", plan.image),
        dataset_path=plan.resolution.dataset,
        measures_path=plan.environment.get("CASA_MEASURES_PATH"),
    )
    record = run_record(plan, facts, str(script), digest, tuple(arguments))
    spec = jobs.run_spec(
        plan,
        run_id=run_id,
        run_dir=str(run_dir),
        script=str(script),
        arguments=arguments,
        started=started,
    )
    prefix = next(iter(plan.labels)).split("/", 1)[0]
    marks = {
        **(annotations or {}),
        f"{prefix}/{RUN_ID}": run_id,
        f"{prefix}/{RUN_DIR}": str(run_dir),
        f"{prefix}/{RUN_STORAGE}": str(storage_path),
        f"{prefix}/{RUN_SCRIPT}": script.name,
        f"{prefix}/{RUN_NONCE}": secrets.token_hex(8),
    }
    job = jobs.run_job(
        plan,
        settings or PodSettings(),
        name=jobs.job_name(plan.username, run_id),
        image=plan.image,
        spec=spec,
        record=record_text(record),
        labels={**(labels or {}), **COMPONENT},
        annotations=marks,
        deadline=deadline,
        ttl=ttl,
        environment=environment,
    )
    level = settings.security_level if settings is not None else "restricted"
    violations = pod_security_violations(job["spec"]["template"], level)
    sentence = pod_security_sentence(violations, level)
    if sentence:
        raise InvalidInput(sentence)
    return job


# The cluster: create, follow, stop
@contextlib.asynccontextmanager
async def cluster(args: argparse.Namespace) -> AsyncIterator[Cluster]:
    """An API client from ``--kubeconfig``, ``$KUBECONFIG`` or the pod's own account."""
    from kubernetes_asyncio import client, config
    from kubernetes_asyncio.config import ConfigException

    namespace = args.namespace
    try:
        if (
            args.kubeconfig
            or os.environ.get("KUBECONFIG")
            or "KUBERNETES_SERVICE_HOST" not in (os.environ)
        ):
            path = args.kubeconfig or os.environ.get("KUBECONFIG") or None
            api = await config.new_client_from_config(config_file=path, persist_config=False)
            if namespace is None:
                _, active = config.list_kube_config_contexts(config_file=path)
                namespace = (active or {}).get("context", {}).get("namespace")
        else:
            configuration = client.Configuration()
            incluster: Any = config.load_incluster_config
            incluster(client_configuration=configuration)
            api = client.ApiClient(configuration)
            if namespace is None:
                account = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
                namespace = account.read_text().strip()
    except (ConfigException, OSError) as exc:
        detail = " ".join(str(exc).split())[:200]
        raise InvalidInput(f"No Kubernetes cluster to run on ({detail}).") from None
    storage = getattr(args, "storage_path", None)
    async with api:
        yield Cluster(api, namespace or "default", Path(storage) if storage else None)


class Cluster:
    """One namespace of the cluster: a run's Job created, followed, stopped."""

    def __init__(
        self,
        api: Any,
        namespace: str,
        storage: Path | None = None,
        patience: float = PATIENCE,
        say: Callable[[str], object] | None = None,
        again: str = "without this command: follow it again with --follow",
    ) -> None:
        from kubernetes_asyncio import client

        self.namespace = namespace
        #: Seconds to wait for an API server that does not answer, where to say so, and what
        #: the user can do once it gave up.
        self.patience = patience
        self.say = say or (lambda text: print(f"casaspawner: {text}", file=sys.stderr, flush=True))
        self.again = again
        self.api = api
        #: The storage root mounted here, where the run's file tells how it ended.
        self.storage = storage
        self.said_unschedulable = False
        self.batch = client.BatchV1Api(api)
        self.core = client.CoreV1Api(api)

    async def create(self, job: dict[str, Any]) -> bool:
        """Create the Job; False when one of its name exists already."""
        from kubernetes_asyncio.client.exceptions import ApiException

        try:
            body: Any = job
            await self.answer(self.batch.create_namespaced_job, self.namespace, body)
            return True
        except ApiException as exc:
            if exc.status == 409:
                # Ours, when an answer was lost and the call made again; else another run's.
                there = await self.job(job["metadata"]["name"])
                nonce = annotation(job["metadata"].get("annotations") or {}, RUN_NONCE)
                theirs = (there.metadata.annotations or {}) if there is not None else {}
                return nonce is not None and annotation(theirs, RUN_NONCE) == nonce
            raise InvalidInput(
                f"Kubernetes refused the run's Job in namespace {self.namespace}: "
                f"{api_reason(exc)}."
            ) from None

    async def answer(self, call: Callable[..., Awaitable[Any]], *args: Any, **kw: Any) -> Any:
        """``call(*args, **kw)``, again while the API server does not answer (restarting, say).

        After ``patience`` seconds without an answer, one sentence: the run goes on.
        """
        import aiohttp
        from kubernetes_asyncio.client.exceptions import ApiException

        first: float | None = None
        while True:
            try:
                return await call(*args, **kw)
            except ApiException as exc:
                if exc.status and exc.status < 500:
                    raise
                problem = api_reason(exc)
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
                problem = " ".join(str(exc).split()) or type(exc).__name__
            now = time.monotonic()
            if first is None:
                first = now
                self.say(
                    f"the Kubernetes API server does not answer ({problem[:120]}); trying again…"
                )
            if now - first > self.patience:
                raise CasaspawnerError(
                    f"The Kubernetes API server did not answer for {self.patience:.0f} s; the "
                    f"run goes on {self.again}."
                )
            await asyncio.sleep(POLL)

    async def job(self, name: str) -> Any | None:
        from kubernetes_asyncio.client.exceptions import ApiException

        try:
            return await self.answer(self.batch.read_namespaced_job, name, self.namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise InvalidInput(
                f"Kubernetes refused to show Job {name}: {api_reason(exc)}."
            ) from None

    async def run_job(self, name: str) -> Any:
        """The run's Job ``name``; one sentence when there is none, or it is not a run's."""
        job = await self.job(name)
        if job is None:
            raise InvalidInput(f"There is no run Job {shown(name)} in namespace {self.namespace}.")
        labels = job.metadata.labels or {}
        if any(labels.get(key) != value for key, value in COMPONENT.items()):
            raise InvalidInput(
                f"Job {shown(name)} in namespace {self.namespace} is not a casaspawner run."
            )
        return job

    async def pod(self, name: str) -> Any | None:
        """The Job's pod (it has one: one try), or None while there is none."""
        from kubernetes_asyncio.client.exceptions import ApiException

        try:
            found = await self.answer(
                self.core.list_namespaced_pod,
                self.namespace,
                label_selector=f"batch.kubernetes.io/job-name={name}",
            )
        except ApiException as exc:
            raise InvalidInput(
                f"Kubernetes refused to list the pods of Job {name}: {api_reason(exc)}."
            ) from None
        return found.items[0] if found.items else None

    async def delete(self, name: str, wait: bool = True) -> None:
        """Delete the Job and its pod, which gets SIGTERM and its grace period.

        With ``wait`` the Job stays, being deleted, until its pod is gone.
        """
        from kubernetes_asyncio.client.exceptions import ApiException

        try:
            await self.answer(
                self.batch.delete_namespaced_job,
                name,
                self.namespace,
                propagation_policy="Foreground" if wait else "Background",
            )
        except ApiException as exc:
            # Gone already: what deleting it was for.
            if exc.status != 404:
                raise InvalidInput(
                    f"Kubernetes refused to delete Job {name}: {api_reason(exc)}."
                ) from None

    async def follow(self, name: str) -> int:
        """Print the run's output as it comes, then say how it ended; Ctrl-C stops it."""
        job = await self.run_job(name)
        annotations = job.metadata.annotations or {}
        run_id = annotation(annotations, RUN_ID) or name
        where = annotation(annotations, RUN_DIR) or ""
        stopping = False
        logs: asyncio.Task[None] | None = None
        try:
            while True:
                try:
                    ended = await self.watch(name, logs)
                    if isinstance(ended, asyncio.Task):
                        logs = ended
                        continue
                    break
                except (KeyboardInterrupt, asyncio.CancelledError):
                    if stopping:
                        raise
                    stopping = True
                    print(f"casaspawner: stopping run {run_id}…", file=sys.stderr, flush=True)
                    await self.delete(name)
        finally:
            if logs is not None:
                # The rest of the log, if the stream is still open: half a minute at most.
                with contextlib.suppress(asyncio.TimeoutError, Exception):
                    await asyncio.wait_for(asyncio.shield(logs), LOG_WAIT)
                logs.cancel()
        if ended.get("exit_code") == EXIT_STOPPED and not stopping:
            ended["failed"] = await self.failure(name)
        stored = stored_run(self.storage, annotations)
        lost = result_from_pod(ended)
        if not stored.get("result") and lost["status"] == "lost":
            await self.complete_record(name, job, ("lost", lost["why"]))
        digest = image_digest(ended.get("image_id") or "")
        if digest and not asks_hub(job) and not has_image_digest(self.storage, annotations):
            # No hub gave the pod its digest: the kubelet's, read now, goes on its record.
            await self.complete_record(name, job, ("digest", digest))
        return self.ending(name, run_id, where, ended, annotations)

    async def complete_record(self, name: str, job: Any, command: tuple[str, str]) -> None:
        """Have a pod of the run's complete its record (:func:`jobs.record_job`), in 2 min."""
        from kubernetes_asyncio.client.exceptions import ApiException

        verb = command[0]
        manifest = self.api.sanitize_for_serialization(job)
        try:
            completing = jobs.record_job(
                manifest, name=jobs.record_job_name(name, verb), command=command
            )
        except (KeyError, TypeError, ValueError):
            print("casaspawner: the run's Job is not one to complete its record.", file=sys.stderr)
            return
        try:
            created = await self.create(completing)
        except (ApiException, InvalidInput) as exc:
            phase = str(exc)
        else:
            phase = "its Job's name is taken"
            if created:
                try:
                    phase = await self.end_of(completing["metadata"]["name"], timeout=150)
                finally:
                    await self.delete(completing["metadata"]["name"], wait=False)
        if phase != "Complete":
            what = "as lost" if verb == "lost" else "with its image's digest"
            print(
                f"casaspawner: the run's record could not be completed {what} ({phase}).",
                file=sys.stderr,
            )

    async def end_of(self, name: str, timeout: float) -> str:
        """How a Job ended (``Complete``, ``Failed``), or that it did not in ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = await self.job(name)
            for c in (job.status.conditions or []) if job is not None and job.status else []:
                if c.type in ("Complete", "Failed") and c.status == "True":
                    return str(c.type)
            await asyncio.sleep(POLL)
        return f"no end in {timeout:.0f} s"

    async def failure(self, name: str, timeout: float = 10) -> str | None:
        """Why the Job failed (its deadline, say), once it says; None when it did not."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = await self.job(name)
            if job is None:
                return None
            reason = failed_condition(job)
            done = any(
                c.type == "Complete" and c.status == "True"
                for c in (job.status.conditions or [] if job.status else [])
            )
            if reason is not None or done:
                return reason
            await asyncio.sleep(POLL)
        return None

    async def watch(self, name: str, logs: asyncio.Task[None] | None) -> Any:
        """Wait until the log can be streamed (a Task) or the run ended (its last state)."""
        while True:
            pod = await self.pod(name)
            job = await self.job(name)
            status = container_status(pod)
            state = status.state if status is not None else None
            started = state is not None and (state.running or state.terminated)
            if logs is None and pod is not None and started:
                # A container that ended already still has its whole log to give.
                return asyncio.create_task(self.stream(name, pod.metadata.name))
            if state is not None and state.terminated is not None:
                return {
                    "exit_code": state.terminated.exit_code,
                    "message": state.terminated.message,
                    "image_id": status.image_id if status is not None else None,
                }
            self.waits_for_node(pod)
            waiting = state.waiting if state is not None else None
            if waiting is not None and waiting.reason in HOPELESS:
                await self.delete(name)
                return {"exit_code": None, "never": f"{waiting.reason}: {waiting.message or ''}"}
            over = job is None or failed_condition(job) is not None
            if over and (pod is None or pod.status.phase in ("Failed", "Succeeded")):
                reason = failed_condition(job) if job is not None else None
                return {
                    "exit_code": None,
                    "gone": reason or "its Job was deleted",
                    "failed": reason,
                }
            await asyncio.sleep(POLL)

    def waits_for_node(self, pod: Any) -> None:
        """Say, once, why the run's pod waits for a node (the scheduler's message)."""
        message = unschedulable(pod)
        if message is not None:
            if not self.said_unschedulable:
                print(f"casaspawner: the run waits for a node: {message}", file=sys.stderr)
            self.said_unschedulable = True

    async def stream(self, name: str, pod: str) -> None:
        """Copy the log of Job ``name``'s pod ``pod`` to stdout until the container ends.

        A broken connection (the API server restarting, say) is made again from the last line's
        time: the log asked for with timestamps, which are cut off, and lines already shown
        skipped.
        """
        import aiohttp

        # The last line's time, and how many lines of that time were shown.
        last, shown_then = "", 0
        while True:
            since = {"since_time": last[:19] + "Z"} if last else {}
            seen_then = 0
            with contextlib.suppress(aiohttp.ClientError, OSError, asyncio.TimeoutError):
                response: Any = await self.answer(
                    self.core.read_namespaced_pod_log,
                    pod,
                    self.namespace,
                    container=jobs.CONTAINER,
                    follow=True,
                    timestamps=True,
                    _preload_content=False,
                    _request_timeout=aiohttp.ClientTimeout(),
                    **since,
                )
                try:
                    async for line in response.content:
                        stamp, _, text = line.partition(b" ")
                        key = stamp_key(stamp)
                        if key < last:
                            continue
                        if key == last:
                            # Lines of one time: those shown before the connection broke.
                            seen_then += 1
                            if seen_then <= shown_then:
                                continue
                            shown_then += 1
                        else:
                            last, shown_then, seen_then = key, 1, 1
                        sys.stdout.buffer.write(text)
                        sys.stdout.flush()
                finally:
                    response.release()
            status = container_status(await self.pod(name))
            if status is None or status.state is None or status.state.terminated is not None:
                return
            await asyncio.sleep(POLL)

    def ending(
        self, name: str, run_id: str, where: str, ended: Any, annotations: dict[str, str]
    ) -> int:
        """One sentence on stderr and the exit status, from the run's file or the pod."""
        run = stored_run(self.storage, annotations)
        if not isinstance(run.get("result"), dict):
            run = {"result": result_from_pod(ended)}
        if run["result"].get("status") == "stopped" and ended.get("failed"):
            # Stopped by the Job's deadline.
            run["result"]["why"] = ended["failed"]
        return ending(Path(run_id), run, where or f"Job {name}")

    async def stop(self, name: str) -> int:
        """Stop a run's Job and wait until its pod is gone; a gone Job is said so.

        Exit status 1 when the Job or its pod is still there after ``STOP_WAIT`` seconds.
        """
        job = await self.run_job(name)
        await self.delete(name)
        deadline = time.monotonic() + STOP_WAIT
        while await self.job(name) is not None or await self.pod(name) is not None:
            if time.monotonic() >= deadline:
                print(
                    f"casaspawner: run Job {name} is still there {STOP_WAIT} s after it was "
                    "deleted; look at it with kubectl.",
                    file=sys.stderr,
                )
                return EXIT_FAILED
            await asyncio.sleep(POLL)
        result = stored_run(self.storage, job.metadata.annotations or {}).get("result")
        result = result if isinstance(result, dict) else {}
        print(
            f"casaspawner: run Job {name} ended: {result.get('status', 'stopped')}.",
            file=sys.stderr,
        )
        return 0


def stamp_key(stamp: bytes) -> str:
    """A log line's RFC 3339 time, its fraction of a second padded, to order as text."""
    text = stamp.decode("ascii", "replace").removesuffix("Z")
    whole, _, fraction = text.partition(".")
    return f"{whole}.{fraction.ljust(9, '0')}"


def annotation(annotations: Mapping[str, str], name: str) -> str | None:
    """The run's annotation ``<prefix>/name``, whatever the label prefix."""
    return next((v for k, v in annotations.items() if k.endswith(f"/{name}")), None)


def unschedulable(pod: Any | None) -> str | None:
    """The scheduler's message, in one line, while ``pod`` waits for a node; else None."""
    for condition in (pod.status.conditions or []) if pod and pod.status else []:
        if condition.type == "PodScheduled" and condition.reason == "Unschedulable":
            return " ".join(str(condition.message or "").split())
    return None


def container_status(pod: Any) -> Any | None:
    """The run container's status in ``pod``, or None."""
    if pod is None or pod.status is None:
        return None
    for status in pod.status.container_statuses or []:
        if status.name == jobs.CONTAINER:
            return status
    return None


def failed_condition(job: Any) -> str | None:
    """Why the Job failed, in words, or None while it has not."""
    for condition in (job.status.conditions or []) if job.status else []:
        # FailureTarget: failed, its pod still ending.
        if condition.type in ("Failed", "FailureTarget") and condition.status == "True":
            if condition.reason == "DeadlineExceeded":
                limit = job.spec.active_deadline_seconds if job.spec else None
                return f"it ran past its time limit of {limit} s"
            return " ".join(f"{condition.reason or ''}: {condition.message or ''}".split())
    return None


def result_from_pod(ended: dict[str, Any]) -> dict[str, Any]:
    """The run's result when its file cannot be read here: from the container's end."""
    code = ended.get("exit_code")
    message = (ended.get("message") or "").strip()
    if ended.get("never"):
        return {"status": "failed", "error": f"its pod could not start ({ended['never']})"}
    if code == 0:
        return {"status": "finished", "exit_code": 0}
    if code == EXIT_STOPPED:
        return {"status": "stopped", "exit_code": code}
    if code == EXIT_FAILED:
        # The script's sentence, or why the pod could not run it (its directory, say).
        error = message.removeprefix("failed: ") or "the run failed"
        return {"status": "failed", "exit_code": code, "error": error}
    if code is None:
        why = f"its pod ended without a result ({ended.get('gone') or 'deleted'})"
    else:
        why = f"its pod ended without a result (exit status {code}: killed, or its node lost)"
    return {"status": "lost", "exit_code": code, "why": why}


def stored_run(storage: Path | None, annotations: dict[str, str]) -> dict[str, Any]:
    """The run's file in the storage mounted here (``--storage-path``); empty when out of reach.

    The hub never follows the user's links: every directory from the storage root down is opened
    without following one, and the file too, as a regular file (a FIFO does not block), of
    ``RUN_FILE_LIMIT`` bytes at most.
    """
    return _stored_json(storage, annotations, RUN_FILE)


def asks_hub(job: Any) -> bool:
    """Whether the run's pod asks a hub for its image's digest (a run from the spawn form)."""
    containers = job.spec.template.spec.containers if job.spec else []
    return any(e.name == RUN_IMAGE_URL_ENV for c in containers for e in c.env or [])


def has_image_digest(storage: Path | None, annotations: dict[str, str]) -> bool:
    """Whether the run's record, read as :func:`stored_run` reads, names its image's digest."""
    record = _stored_json(storage, annotations, RECORD_FILE)
    graph = record.get("@graph")
    return any(
        isinstance(e, dict) and e.get("@id") == RECORD_RUNTIME_ID and bool(e.get("sha256"))
        for e in (graph if isinstance(graph, list) else [])
    )


def _stored_json(storage: Path | None, annotations: dict[str, str], name: str) -> dict[str, Any]:
    """The JSON object in file ``name`` of the run's directory, or an empty one."""
    relative = annotation(annotations, RUN_STORAGE)
    if not relative or not storage:
        return {}
    path = PurePosixPath(relative)
    if path.is_absolute() or ".." in path.parts:
        return {}
    try:
        with open_directory(storage) as base, open_file(base, path / name) as handle:
            data = handle.read(RUN_FILE_LIMIT + 1) if handle is not None else b""
        found = json.loads(data) if 0 < len(data) <= RUN_FILE_LIMIT else {}
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def api_reason(exc: Any) -> str:
    """The API server's message in a refusal, in one line."""
    try:
        message = json.loads(exc.body).get("message", "")
    except (TypeError, ValueError, AttributeError):
        message = ""
    return " ".join(str(message or exc.reason or exc.status).split())[:300]

"""A session's reproducibility record: an RO-Crate built from its plan.

The record says what ran and why, so that another tool, or the user years later, can tell exactly
which CASA build, image or environment and measures data a session used on which dataset. It is
an `RO-Crate 1.1 <https://w3id.org/ro/crate/1.1>`_ whose metadata file conforms to the `Process
Run Crate <https://w3id.org/ro/wfrun/process/0.5>`_ profile of the Workflow Run Crate family: the
session is one ``CreateAction`` whose instrument is the CASA build, whose objects are the dataset
(with the evidence file that decided the build), the measures data and the user's options, with
a start time and, once the session ends, an end time.

This module only builds the record, from the plan and the facts the hub knows; it does no I/O.
The session writes it into the user's storage, as the user, and completes it
(:mod:`casaspawner.insession.record`): the evidence file's sha256, the measures data's version,
the end time. The ``@id`` of each entity the session completes is fixed in
:mod:`casaspawner.runtime`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import PurePosixPath
from typing import Any, Literal
from urllib.parse import quote

from casaspawner import __version__ as CASASPAWNER_VERSION
from casaspawner.errors import InvalidInput
from casaspawner.plan import INTERFACES, SessionPlan, StorageLayout
from casaspawner.runtime import (
    RECORD_ACTION_ID,
    RECORD_EVIDENCE_ID,
    RECORD_FILE,
    RECORD_MEASURES_ID,
    RECORD_RUNTIME_ID,
)
from casaspawner.session.readers import locate_in_storage

RO_CRATE = "https://w3id.org/ro/crate/1.1"
#: The contexts: RO-Crate's, and the Workflow Run Crate terms (``ContainerImage``, ``sha256``).
CONTEXT = (f"{RO_CRATE}/context", "https://w3id.org/ro/terms/workflow-run/context")
PROCESS_RUN_CRATE = "https://w3id.org/ro/wfrun/process/0.5"
DOCKER_IMAGE = "https://w3id.org/ro/terms/workflow-run#DockerImage"
ACTIVE = "http://schema.org/ActiveActionStatus"
COMPLETED = "http://schema.org/CompletedActionStatus"
#: What kind of thing ran CASA: a container image (Kubernetes) or an environment (one machine).
RuntimeKind = Literal["image", "environment"]
#: The default directory of the records, relative to the user's home.
RECORDS_DIR = ".casaspawner/sessions"

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")


@dataclass(frozen=True)
class Runtime:
    """What ran CASA, and its digest when the hub knows it.

    ``reference`` is the image reference, or the environment's directory. ``sha256`` is the
    image's digest or the environment's content hash, 64 hex digits; ``how`` says what was
    hashed, in words.
    """

    kind: RuntimeKind
    reference: str
    sha256: str | None = None
    how: str = ""


@dataclass(frozen=True)
class RecordFacts:
    """What the record says beyond the plan: times, versions and the runtime."""

    started: datetime
    runtime: Runtime
    hub_version: str | None = None
    casaspawner_version: str = CASASPAWNER_VERSION
    #: The dataset directory as the session sees it; None when it is not in the user's storage.
    dataset_path: str | None = None
    #: Where the session reads the measures data.
    measures_path: str | None = None


def utc_text(moment: datetime) -> str:
    """An ISO 8601 time in UTC, to the second: ``2026-12-06T02:15:00Z``."""
    if moment.tzinfo is None:
        raise ValueError("a record's times are aware datetimes")
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def record_name(plan: SessionPlan, started: datetime) -> str:
    """The record's directory name: the UTC start time and the dataset, file-name safe.

    For example ``20261206T021500Z-2023.1.01234.S``.
    """
    stamp = started.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    last = PurePosixPath(plan.resolution.dataset.rstrip("/")).name or plan.resolution.dataset
    slug = _UNSAFE.sub("_", last).strip("._-")[:60] or "dataset"
    return f"{stamp}-{slug}"


def record_directory(plan: SessionPlan, started: datetime, records_dir: str = RECORDS_DIR) -> str:
    """Where the session writes its record: ``<home>/<records_dir>/<record name>``.

    ``records_dir`` is relative to the home and may not leave it.
    """
    relative = PurePosixPath(records_dir)
    if relative.is_absolute() or ".." in relative.parts or not relative.parts:
        raise InvalidInput(f"{records_dir!r} is not a directory inside the home.")
    return str(PurePosixPath(plan.home) / relative / record_name(plan, started))


def dataset_path(plan: SessionPlan, layout: StorageLayout) -> str | None:
    """The dataset's directory in the session, or None when it is not in the user's storage.

    An identifier the archive answered, or a path outside the storage, has none.
    """
    if plan.resolution.evidence.kind == "archive-manifest":
        return None
    try:
        root, relative = locate_in_storage(plan.options.dataset, plan.identity, layout)
    except InvalidInput:
        return None
    return str(PurePosixPath(root.mount) / relative)


def image_digest(image_id: str) -> str | None:
    """The sha256 digest in a container status's ``imageID``, as 64 hex digits.

    For example ``ghcr.io/casaspawner/casa@sha256:…`` or ``docker-pullable://…@sha256:…``.
    """
    found = _DIGEST.search(image_id)
    return found.group(1) if found else None


def image_parts(reference: str) -> dict[str, str]:
    """An image reference's registry, name and tag, as ``ContainerImage`` properties."""
    name, registry = reference.split("@", 1)[0], ""
    first, _, rest = name.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        registry, name = first, rest
    tag = ""
    if ":" in name.rsplit("/", 1)[-1]:
        name, tag = name.rsplit(":", 1)
    parts = {"registry": registry or "docker.io", "name": name}
    if tag:
        parts["tag"] = tag
    return parts


def session_record(
    plan: SessionPlan,
    facts: RecordFacts,
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The record of a starting session, as RO-Crate JSON-LD.

    ``options`` are the user's options as given (the plan's are used when None). The session
    adds the evidence file's sha256, the measures version and the end time.
    """
    release, resolution = plan.release, plan.resolution
    started = utc_text(facts.started)
    given = (
        options
        if options is not None
        else {
            "dataset": plan.options.dataset,
            "interface": plan.options.interface,
            "size": plan.options.size,
            "release": plan.options.release,
        }
    )
    option_entities = [
        _property(f"#option-{name}", name, value)
        for name, value in sorted(given.items())
        if isinstance(value, str | int | float | bool)
    ]
    dataset = _dataset_entity(plan, facts)
    evidence = _evidence_entity(plan, facts)
    measures = {
        "@id": RECORD_MEASURES_ID,
        "@type": "Dataset",
        "name": "CASA measures data",
        "description": "The measures data (IERS, ephemerides, observatories) the session read.",
    }
    if facts.measures_path:
        measures["contentUrl"] = _file_url(facts.measures_path, directory=True)
    if plan.measures_version:
        # The directory of the measures volume (kept by version) the session mounted.
        measures["identifier"] = plan.measures_version
    runtime = _runtime_entity(facts.runtime)
    casa: dict[str, Any] = {
        "@id": "#casa",
        "@type": "SoftwareApplication",
        "name": "CASA",
        "softwareVersion": release.casa,
        "identifier": release.id,
        "description": release.label,
        "url": "https://casa.nrao.edu/",
    }
    instruments = [{"@id": "#casa"}]
    applications = [casa]
    if release.pipeline:
        casa["softwareRequirements"] = [{"@id": "#pipeline"}]
        applications.append(
            {
                "@id": "#pipeline",
                "@type": "SoftwareApplication",
                "name": "ALMA pipeline",
                "softwareVersion": release.pipeline,
            }
        )
    facts_entities = [
        _property("#exact", "exact", plan.exact, "Whether this is the build that made the data."),
        _property(
            "#approximate",
            "approximate",
            plan.approximate,
            "Whether this machine ran a nearby release instead of the one asked for.",
        ),
        _property("#processed-with", "processed with", _processed_with(plan)),
    ]
    action: dict[str, Any] = {
        "@id": RECORD_ACTION_ID,
        "@type": "CreateAction",
        "name": f"CASA session: {plan.summary}",
        "description": plan.reason,
        "instrument": instruments,
        "agent": {"@id": "#user"},
        "object": [
            {"@id": dataset["@id"]},
            {"@id": RECORD_MEASURES_ID},
            *({"@id": e["@id"]} for e in option_entities),
        ],
        "additionalProperty": [{"@id": e["@id"]} for e in facts_entities],
        "startTime": started,
        "actionStatus": {"@id": ACTIVE},
    }
    if facts.runtime.kind == "image":
        action["containerImage"] = {"@id": RECORD_RUNTIME_ID}
    else:
        instruments.append({"@id": RECORD_RUNTIME_ID})
    tools = [
        _application("#casaspawner", "casaspawner", facts.casaspawner_version),
        _application("#jupyterhub", "JupyterHub", facts.hub_version),
    ]
    organize = {
        "@id": "#spawn",
        "@type": "OrganizeAction",
        "name": "The hub chose the CASA build for the dataset and started the session.",
        "instrument": [{"@id": "#casaspawner"}, {"@id": "#jupyterhub"}],
        "result": {"@id": RECORD_ACTION_ID},
        "startTime": started,
    }
    root = {
        "@id": "./",
        "@type": "Dataset",
        "name": f"What ran: {INTERFACES[plan.interface]} on {resolution.dataset}",
        "description": (
            f"Reproducibility record of a casaspawner session: {plan.summary}. {plan.reason}"
        ),
        "datePublished": started,
        "conformsTo": [{"@id": PROCESS_RUN_CRATE}],
        "mentions": [{"@id": RECORD_ACTION_ID}, {"@id": "#spawn"}],
        "about": {"@id": dataset["@id"]},
    }
    graph: list[dict[str, Any]] = [
        {
            "@id": RECORD_FILE,
            "@type": "CreativeWork",
            "conformsTo": {"@id": RO_CRATE},
            "about": {"@id": "./"},
        },
        root,
        {
            "@id": PROCESS_RUN_CRATE,
            "@type": "CreativeWork",
            "name": "Process Run Crate",
            "version": "0.5",
        },
        action,
        organize,
        *applications,
        runtime,
        *tools,
        {"@id": "#user", "@type": "Person", "name": plan.username},
        dataset,
        *([evidence] if evidence else []),
        measures,
        *option_entities,
        *facts_entities,
    ]
    return {"@context": list(CONTEXT), "@graph": graph}


def run_record(
    plan: SessionPlan,
    facts: RecordFacts,
    script: str,
    script_sha256: str | None,
    arguments: tuple[str, ...] = (),
) -> dict[str, Any]:
    """The record of a headless run: a session record of one script.

    ``casaspawner run`` writes it.

    The same entities as a session's, without JupyterHub; the script (with its sha256) and its
    arguments are objects of the action. ``script`` is its path as the run sees it.
    """
    options = {
        "dataset": plan.options.dataset,
        "size": plan.options.size,
        "release": plan.options.release,
    }
    record = session_record(plan, facts, options)
    name = PurePosixPath(script).name
    graph = [e for e in record["@graph"] if e["@id"] != "#jupyterhub"]
    entities = {e["@id"]: e for e in graph}
    script_entity: dict[str, Any] = {
        "@id": "#script",
        "@type": ["File", "SoftwareSourceCode"],
        "name": name,
        "contentUrl": _file_url(script),
        "description": "The script the run ran with CASA.",
    }
    if script_sha256:
        script_entity["sha256"] = script_sha256
    argument = _property("#arguments", "arguments", json.dumps(list(arguments)))
    action = entities[RECORD_ACTION_ID]
    action["name"] = f"Headless CASA run: {name} with {plan.release.label}"
    action["object"] = [{"@id": "#script"}, {"@id": "#arguments"}, *action["object"]]
    organize = entities["#spawn"]
    organize["name"] = "casaspawner chose the CASA build for the dataset and started the run."
    organize["instrument"] = [{"@id": "#casaspawner"}]
    root = entities["./"]
    summary = f"{name} with {plan.release.label} on {plan.resolution.dataset}"
    root["name"] = f"What ran: {summary}"
    root["description"] = (
        f"Reproducibility record of a headless casaspawner run: {summary}. {plan.reason}"
    )
    return {**record, "@graph": [*graph, script_entity, argument]}


def _file_url(path: str, directory: bool = False) -> str:
    url = "file://" + quote(path.rstrip("/") if directory else path)
    return url + "/" if directory else url


def _dataset_entity(plan: SessionPlan, facts: RecordFacts) -> dict[str, Any]:
    """The dataset: its directory in the user's storage, or the identifier the archive knows."""
    resolution = plan.resolution
    entity: dict[str, Any] = {
        "@id": "#dataset",
        "@type": "Dataset",
        "name": resolution.dataset,
        "identifier": plan.options.dataset,
    }
    if facts.dataset_path:
        entity["contentUrl"] = _file_url(facts.dataset_path, directory=True)
    if resolution.evidence.kind != "none":
        entity["hasPart"] = [{"@id": RECORD_EVIDENCE_ID}]
    return entity


def _evidence_entity(plan: SessionPlan, facts: RecordFacts) -> dict[str, Any] | None:
    """The file that decided the build, with its sha256 when the hub read the file.

    The session adds the sha256 of a file in the user's storage.
    """
    evidence = plan.resolution.evidence
    if evidence.kind == "none":
        return None
    path, _, member = evidence.path.partition("!")
    entity: dict[str, Any] = {
        "@id": RECORD_EVIDENCE_ID,
        "@type": "File",
        "name": evidence.path,
        "additionalType": evidence.kind,
        "description": f"The evidence that decided the build ({evidence.kind}).",
    }
    if member:
        entity["description"] = (
            f"The evidence that decided the build ({evidence.kind}): {member}, packed in "
            f"{path}; the sha256 is the packed file's."
        )
    if facts.dataset_path and evidence.kind != "archive-manifest":
        entity["contentUrl"] = _file_url(str(PurePosixPath(facts.dataset_path) / path))
    if evidence.sha256:
        entity["sha256"] = evidence.sha256
    return entity


def _runtime_entity(runtime: Runtime) -> dict[str, Any]:
    """The image (Kubernetes) or the environment (one machine) CASA ran from."""
    if runtime.kind == "image":
        entity: dict[str, Any] = {
            "@id": RECORD_RUNTIME_ID,
            "@type": "ContainerImage",
            "additionalType": {"@id": DOCKER_IMAGE},
            **image_parts(runtime.reference),
            "identifier": runtime.reference,
        }
    else:
        entity = {
            "@id": RECORD_RUNTIME_ID,
            "@type": "SoftwareApplication",
            "name": "CASA environment",
            "identifier": runtime.reference,
        }
    if runtime.sha256:
        entity["sha256"] = runtime.sha256
    if runtime.how:
        entity["description"] = runtime.how
    return entity


def _application(entity_id: str, name: str, version: str | None) -> dict[str, Any]:
    entity = {"@id": entity_id, "@type": "SoftwareApplication", "name": name}
    if version:
        entity["softwareVersion"] = version
    return entity


def _property(
    entity_id: str, name: str, value: str | int | float | bool | None, description: str = ""
) -> dict[str, Any]:
    entity: dict[str, Any] = {
        "@id": entity_id,
        "@type": "PropertyValue",
        "name": name,
        "value": value,
    }
    if description:
        entity["description"] = description
    return entity


def _processed_with(plan: SessionPlan) -> str:
    evidence = plan.resolution.evidence
    if evidence.kind == "none":
        return "unknown: nothing in the dataset tells the version"
    text = f"CASA {evidence.casa}" if evidence.casa else "CASA unknown"
    return f"{text}, pipeline {evidence.pipeline}" if evidence.pipeline else text

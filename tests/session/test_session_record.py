"""The reproducibility record: built from the plan by the hub, written by the session."""

from __future__ import annotations

import base64
import functools
import hashlib
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
import zlib
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from support.servers import serving

from casaspawner.catalog import Catalog
from casaspawner.datasets.model import Evidence, Resolution
from casaspawner.datasets.resolve import resolve_path
from casaspawner.datasets.synth import write_dataset
from casaspawner.errors import InvalidInput
from casaspawner.insession import record as insession
from casaspawner.local import run_job
from casaspawner.net import free_port
from casaspawner.plan import (
    Identity,
    PlanConfig,
    SessionOptions,
    SessionPlan,
    StorageLayout,
    Substitution,
    make_plan,
)
from casaspawner.runtime import (
    RECORD_DIR_ENV,
    RECORD_ENV,
    RECORD_FILE,
    RECORD_LIMIT,
    RUN_IMAGE_KEY_ENV,
    RUN_IMAGE_KEY_HEADER,
    RUN_IMAGE_URL_ENV,
    record_from_text,
    record_text,
)
from casaspawner.session.record import (
    COMPLETED,
    PROCESS_RUN_CRATE,
    RecordFacts,
    Runtime,
    dataset_path,
    image_digest,
    image_parts,
    record_directory,
    record_name,
    run_record,
    session_record,
)

STARTED = datetime(2026, 12, 6, 2, 15, 0, tzinfo=timezone.utc)
IMAGE = "ghcr.io/casaspawner/casa:6.5.4-9-pipeline-2023.1.0.124"
DIGEST = "a" * 64


def layout(storage: Path) -> StorageLayout:
    return StorageLayout(
        home_mount=str(storage / "home") + "/{username}",
        project_mount=str(storage / "projects") + "/{group}",
    )


def alice_plan(
    storage: Path, catalog: Catalog, era: str = "cycle10", **options: str
) -> tuple[SessionPlan, Path]:
    """alice's plan for a synthetic dataset in her home under ``storage``."""
    home = storage / "home" / "alice"
    member = write_dataset(home / "data" / era, era)
    typed = "~/" + str(member.relative_to(home))
    resolution = resolve_path(member, catalog, label=typed)
    config = PlanConfig(storage=layout(storage))
    plan = make_plan(
        Identity("alice", 54321, 54321),
        SessionOptions(typed, **options),
        catalog,
        resolution,
        config,
    )
    return plan, member


def graph(record: dict) -> dict[str, dict]:
    return {item["@id"]: item for item in record["@graph"]}


def written(directory: Path) -> dict:
    return json.loads((directory / RECORD_FILE).read_text())


def test_the_record_of_an_exact_session(tmp_path: Path, catalog: Catalog) -> None:
    plan, member = alice_plan(tmp_path, catalog)
    facts = RecordFacts(
        STARTED,
        Runtime("image", IMAGE, DIGEST, "the pod's imageID"),
        hub_version="5.3.0",
        dataset_path=dataset_path(plan, layout(tmp_path)),
        measures_path="/opt/casa/measures",
    )
    record = session_record(plan, facts)
    assert record["@context"] == [
        "https://w3id.org/ro/crate/1.1/context",
        "https://w3id.org/ro/terms/workflow-run/context",
    ]
    entities = graph(record)
    assert entities[RECORD_FILE]["conformsTo"] == {"@id": "https://w3id.org/ro/crate/1.1"}
    assert entities["./"]["conformsTo"] == [{"@id": PROCESS_RUN_CRATE}]
    action = entities["#session"]
    assert action["@type"] == "CreateAction"
    assert action["startTime"] == "2026-12-06T02:15:00Z" and "endTime" not in action
    assert action["actionStatus"] == {"@id": "http://schema.org/ActiveActionStatus"}
    assert action["description"] == plan.reason
    casa = entities[action["instrument"][0]["@id"]]
    assert (casa["name"], casa["softwareVersion"], casa["identifier"]) == (
        "CASA",
        "6.5.4-9",
        "pl-2023.1.0.124",
    )
    assert entities["#pipeline"]["softwareVersion"] == "2023.1.0.124"
    image = entities[action["containerImage"]["@id"]]
    assert image["@type"] == "ContainerImage" and image["sha256"] == DIGEST
    assert (image["registry"], image["name"], image["tag"]) == (
        "ghcr.io",
        "casaspawner/casa",
        "6.5.4-9-pipeline-2023.1.0.124",
    )
    objects = [entities[o["@id"]] for o in action["object"]]
    dataset = objects[0]
    assert dataset["@type"] == "Dataset" and dataset["identifier"] == plan.options.dataset
    assert dataset["contentUrl"] == f"file://{member}/"
    evidence = entities[dataset["hasPart"][0]["@id"]]
    assert evidence["@type"] == "File" and evidence["additionalType"] == "manifest"
    assert evidence["contentUrl"] == f"file://{member / plan.resolution.evidence.path}"
    options = {o["name"]: o["value"] for o in objects if o["@type"] == "PropertyValue"}
    assert options == {"dataset": plan.options.dataset, "interface": "lab", "size": "medium"}
    facts_seen = {
        entities[p["@id"]]["name"]: entities[p["@id"]]["value"]
        for p in action["additionalProperty"]
    }
    assert facts_seen == {
        "exact": True,
        "approximate": False,
        "processed with": "CASA 6.5.4-9, pipeline 2023.1.0.124",
    }
    versions = {
        e["name"]: e.get("softwareVersion")
        for e in entities.values()
        if e["@id"] in ("#casaspawner", "#jupyterhub")
    }
    assert versions == {"casaspawner": facts.casaspawner_version, "JupyterHub": "5.3.0"}
    assert entities["#user"] == {"@id": "#user", "@type": "Person", "name": "alice"}
    # Every reference names an entity of the graph.
    ids = set(entities)
    refs = [v["@id"] for e in entities.values() for v in _references(e)]
    assert not [r for r in refs if r not in ids and not r.startswith("http")]
    # One line without braces, for a variable KubeSpawner expands templates in; compressed.
    text = record_text(record)
    assert record_from_text(text) == record and not set("{}\n") & set(text)
    plain = base64.b64encode(json.dumps(record).encode()).decode()
    assert len(text) < len(plain) / 2


def test_a_record_variable_is_read_plain_or_compressed_and_bounded(tmp_path: Path) -> None:
    record = {"@graph": [{"@id": "#session", "name": "x" * 1000}]}
    plain = base64.b64encode(json.dumps(record).encode()).decode()
    assert record_from_text(plain) == record == record_from_text(record_text(record))
    # As earlier hubs wrote it, plain: the session still writes it.
    insession.start({RECORD_ENV: plain, RECORD_DIR_ENV: str(tmp_path / "r")})
    assert written(tmp_path / "r")["@graph"][0]["name"] == "x" * 1000
    bomb = base64.b64encode(zlib.compress(b"[" + b" " * (RECORD_LIMIT + 10) + b"]")).decode()
    cut = base64.b64encode(zlib.compress(json.dumps(record).encode())[:-8]).decode()
    for bad in (bomb, cut, base64.b64encode(b"not a record").decode(), "no base64!"):
        with pytest.raises(ValueError):
            record_from_text(bad)


def _references(entity: dict) -> list[dict]:
    found = []
    for key, value in entity.items():
        if key == "@id":
            continue
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, dict) and set(item) == {"@id"}:
                found.append(item)
    return found


def test_the_session_writes_observes_and_completes_the_record(
    tmp_path: Path, catalog: Catalog
) -> None:
    plan, member = alice_plan(tmp_path, catalog)
    measures = tmp_path / "cache" / "measures" / "casadata" / "casadata" / "__data__"
    (measures / "geodetic").mkdir(parents=True)
    (measures.parent.parent / "casadata-2025.9.22.dist-info").mkdir()
    facts = RecordFacts(
        STARTED,
        Runtime("environment", "/var/cache/casaspawner/envs/6.5.4-9", "b" * 64, "packages"),
        dataset_path=dataset_path(plan, layout(tmp_path)),
    )
    directory = Path(record_directory(plan, STARTED))
    directory = tmp_path / directory.relative_to("/")
    environ = {
        RECORD_ENV: record_text(session_record(plan, facts)),
        RECORD_DIR_ENV: str(directory),
        "CASA_MEASURES_PATH": str(measures),
    }
    assert insession.start(environ) == directory
    entities = graph(written(directory))
    manifest = member / plan.resolution.evidence.path
    assert entities["#evidence"]["sha256"] == hashlib.sha256(manifest.read_bytes()).hexdigest()
    assert entities["#evidence"]["contentSize"] == str(manifest.stat().st_size)
    assert entities["#measures"]["version"] == "casadata 2025.9.22"
    assert entities["#measures"]["contentUrl"] == f"file://{measures}/"
    # Locally the environment is an instrument beside CASA, with its content hash.
    action = entities["#session"]
    assert {"@id": "#runtime"} in action["instrument"] and "containerImage" not in action
    assert entities["#runtime"]["sha256"] == "b" * 64
    assert oct(directory.stat().st_mode & 0o777) == "0o700"
    # The record is kept when the server starts again in the same session.
    assert insession.complete(directory)
    first = written(directory)
    ended = first["@graph"]
    action = graph(first)["#session"]
    end = datetime.strptime(action["endTime"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    assert STARTED <= end <= datetime.now(timezone.utc) + timedelta(seconds=1)
    assert action["actionStatus"] == {"@id": COMPLETED}
    assert not insession.complete(directory)
    assert written(directory)["@graph"] == ended
    assert insession.main(["stop", str(directory)]) == 0
    # The server started again in the same session: the same record, open again.
    assert insession.start(environ) == directory
    again = graph(written(directory))["#session"]
    assert "endTime" not in again and again["startTime"] == "2026-12-06T02:15:00Z"
    assert again["actionStatus"] == {"@id": "http://schema.org/ActiveActionStatus"}
    assert insession.complete(directory)
    assert insession.main(["stop"]) == 2
    assert not list(directory.glob(".record-*"))


def test_only_a_regular_file_is_hashed(tmp_path: Path) -> None:
    regular = tmp_path / "manifest.xml"
    regular.write_bytes(b"<manifest/>")
    assert insession.file_sha256(regular) == (hashlib.sha256(b"<manifest/>").hexdigest(), 11)
    assert insession.file_sha256(regular, limit=10) is None
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    # Opened without waiting for a writer, and never read.
    assert insession.file_sha256(fifo) is None
    assert insession.file_sha256(tmp_path / "missing") is None
    assert insession.file_sha256(tmp_path) is None


def test_rocrate_reads_the_record(tmp_path: Path, catalog: Catalog) -> None:
    rocrate = pytest.importorskip("rocrate.rocrate")
    plan, _ = alice_plan(tmp_path, catalog)
    facts = RecordFacts(
        STARTED, Runtime("image", IMAGE), dataset_path=dataset_path(plan, layout(tmp_path))
    )
    directory = tmp_path / "record"
    environ = {
        RECORD_ENV: record_text(session_record(plan, facts)),
        RECORD_DIR_ENV: str(directory),
    }
    insession.start(environ)
    insession.complete(directory)
    crate = rocrate.ROCrate(directory)
    action = crate.get("#session")
    assert action.type == "CreateAction"
    assert action["endTime"] and action["startTime"] == "2026-12-06T02:15:00Z"
    assert crate.get("#casa")["softwareVersion"] == "6.5.4-9"
    assert crate.get("#evidence")["sha256"]
    assert [p.id for p in crate.root_dataset["conformsTo"]] == [PROCESS_RUN_CRATE]


def test_a_headless_runs_record_names_its_script_and_how_it_failed(
    tmp_path: Path, catalog: Catalog
) -> None:
    rocrate = pytest.importorskip("rocrate.rocrate")
    plan, _ = alice_plan(tmp_path, catalog)
    facts = RecordFacts(STARTED, Runtime("environment", "/envs/6.5.4-9", DIGEST, "packages"))
    record = run_record(plan, facts, "/data/script/scriptForPI.py", "b" * 64, ("--x", "1"))
    directory = tmp_path / "run"
    insession.start({RECORD_ENV: record_text(record), RECORD_DIR_ENV: str(directory)})
    insession.complete(directory, insession.FAILED, "the script exited with status 3")
    crate = rocrate.ROCrate(directory)
    action = crate.get("#session")
    assert (
        action["name"]
        == "Headless CASA run: scriptForPI.py with CASA 6.5.4-9 (pipeline 2023.1.0.124)"
    )
    assert action["actionStatus"] == insession.FAILED
    assert action["error"] == "the script exited with status 3"
    script = crate.get("#script")
    assert script["sha256"] == "b" * 64 and script["name"] == "scriptForPI.py"
    assert json.loads(crate.get("#arguments")["value"]) == ["--x", "1"]
    assert crate.get("#jupyterhub") is None
    assert "#option-interface" not in {e.id for e in crate.get_entities()}
    assert crate.get("#casa")["identifier"] == plan.release.id


def test_an_approximate_session_says_why(tmp_path: Path, catalog: Catalog) -> None:
    home = tmp_path / "home" / "alice"
    member = write_dataset(home / "d", "cycle10")
    resolution = resolve_path(member, catalog, label="~/d")
    nearest = next(r for r in catalog.available() if r.wheels is not None)
    plan = make_plan(
        Identity("alice", 54321, 54321),
        SessionOptions("~/d", interface="desktop"),
        catalog,
        resolution,
        PlanConfig(storage=layout(tmp_path)),
        Substitution(nearest, "This machine cannot install it; the session runs another"),
    )
    entities = graph(session_record(plan, RecordFacts(STARTED, Runtime("environment", "/e"))))
    assert entities["#approximate"]["value"] is True and entities["#exact"]["value"] is False
    assert "the dataset calls for" in entities["#session"]["description"]
    assert entities["#casa"]["softwareVersion"] == nearest.casa
    assert entities["#option-interface"]["value"] == "desktop"
    # No sha256 the hub does not know.
    assert "sha256" not in entities["#runtime"]


def test_a_dataset_from_the_archive_names_the_manifest_the_hub_read(catalog: Catalog) -> None:
    release = catalog.get("pl-2023.1.0.124")
    digest = "ab" * 32
    resolution = Resolution(
        "2023.1.01234.S",
        Evidence(
            "archive-manifest",
            "uid___A001_X1:manifest.xml",
            "6.5.4-9",
            "2023.1.0.124",
            None,
            digest,
        ),
        release,
        True,
        "The archive's pipeline manifest names it.",
    )
    plan = make_plan(
        Identity("alice", 54321, 54321), SessionOptions("2023.1.01234.S"), catalog, resolution
    )
    assert dataset_path(plan, StorageLayout()) is None
    entities = graph(session_record(plan, RecordFacts(STARTED, Runtime("image", IMAGE))))
    assert "contentUrl" not in entities["#dataset"] and "contentUrl" not in entities["#evidence"]
    assert entities["#evidence"]["name"] == "uid___A001_X1:manifest.xml"
    assert entities["#evidence"]["sha256"] == digest
    # The session keeps the hub's digest, and says the measures named no version.
    observed = graph(
        insession.observe(session_record(plan, RecordFacts(STARTED, Runtime("image", IMAGE))), {})
    )
    assert observed["#evidence"]["sha256"] == digest
    assert observed["#measures"]["version"].startswith("unknown")


def test_a_dataset_without_evidence_names_none(catalog: Catalog) -> None:
    chosen = catalog.get("pl-2023.1.0.124")
    resolution = Resolution("~/x", Evidence("none", "", None, None), chosen, False, "You chose.")
    plan = make_plan(Identity("alice", 54321, 54321), SessionOptions("~/x"), catalog, resolution)
    entities = graph(session_record(plan, RecordFacts(STARTED, Runtime("image", IMAGE))))
    assert "#evidence" not in entities and "hasPart" not in entities["#dataset"]
    assert entities["#processed-with"]["value"].startswith("unknown")
    assert dataset_path(plan, StorageLayout()) == "/arc/home/alice/x"


def test_names_digests_and_image_parts(tmp_path: Path, catalog: Catalog) -> None:
    plan, _ = alice_plan(tmp_path, catalog)
    name = record_name(plan, STARTED)
    assert name.startswith("20261206T021500Z-member.uid___")
    assert record_directory(plan, STARTED).startswith(f"{plan.home}/.casaspawner/sessions/")
    with pytest.raises(InvalidInput):
        record_directory(plan, STARTED, "../elsewhere")
    with pytest.raises(InvalidInput):
        record_directory(plan, STARTED, "/tmp")
    with pytest.raises(ValueError, match="aware"):
        session_record(plan, RecordFacts(datetime(2026, 1, 1), Runtime("image", IMAGE)))
    assert image_digest(f"docker-pullable://{IMAGE}@sha256:{DIGEST}") == DIGEST
    assert image_digest(f"ghcr.io/casaspawner/casa@sha256:{DIGEST}") == DIGEST
    assert image_digest("sha256:" + "0" * 10) is None
    assert image_parts("casa:1") == {"registry": "docker.io", "name": "casa", "tag": "1"}
    assert image_parts(f"localhost:5000/casa@sha256:{DIGEST}") == {
        "registry": "localhost:5000",
        "name": "casa",
    }


@pytest.mark.integration
def test_the_sessions_jupyter_server_writes_the_record_and_completes_it_on_sigterm(
    tmp_path: Path, catalog: Catalog
) -> None:
    """The server extension as sessions load it: SIGTERM (a pod deleted, the hub stopping a
    local session) ends the server cleanly, and the record gets its end time."""
    pytest.importorskip("jupyter_server")
    plan, _ = alice_plan(tmp_path, catalog)
    facts = RecordFacts(
        STARTED, Runtime("image", IMAGE), dataset_path=dataset_path(plan, layout(tmp_path))
    )
    directory = tmp_path / "record"
    env = {
        **os.environ,
        RECORD_ENV: record_text(session_record(plan, facts)),
        RECORD_DIR_ENV: str(directory),
        "HOME": str(tmp_path),
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
    }
    extensions = "{'casaspawner.insession.record': True}"
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jupyter_server",
            "--no-browser",
            "--allow-root",
            f"--port={free_port()}",
            f"--ServerApp.jpserver_extensions={extensions}",
            f"--ServerApp.root_dir={tmp_path}",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while "sha256" not in _evidence_of(directory) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "sha256" in _evidence_of(directory)
        assert "endTime" not in graph(written(directory))["#session"]
        server.send_signal(signal.SIGTERM)
        _, log = server.communicate(timeout=60)
    finally:
        server.kill()
        server.wait()
    action = graph(written(directory))["#session"]
    assert action["actionStatus"] == {"@id": COMPLETED} and action["endTime"], log[-2000:]


def _evidence_of(directory: Path) -> dict:
    try:
        return graph(written(directory)).get("#evidence", {})
    except (OSError, ValueError):
        return {}


class HubAPI:
    """A stand-in for the hub's REST API: one user's model, to the one token it knows."""

    def __init__(self, digest: str | None) -> None:
        self.digest = digest
        self.asked: list[str] = []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                hub.asked.append(self.path)
                if self.headers.get("Authorization") != "token session-token":
                    self.send_response(403)
                    self.end_headers()
                    return
                options = {"casaspawner": {"summary": "…"}}
                if hub.digest is not None:
                    options["casaspawner"]["image_digest"] = hub.digest
                body = json.dumps({"name": "alice", "servers": {"": {"user_options": options}}})
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body.encode())

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def environ(self) -> dict[str, str]:
        return {
            "JUPYTERHUB_API_URL": f"http://127.0.0.1:{self.server.server_port}/hub/api",
            "JUPYTERHUB_API_TOKEN": "session-token",
            "JUPYTERHUB_USER": "alice",
            "JUPYTERHUB_SERVER_NAME": "",
        }

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_pod_session_asks_the_hub_for_its_image_digest(tmp_path: Path, catalog: Catalog) -> None:
    plan, _ = alice_plan(tmp_path, catalog)
    facts = RecordFacts(STARTED, Runtime("image", IMAGE))
    directory = tmp_path / "record"
    insession.start(
        {RECORD_ENV: record_text(session_record(plan, facts)), RECORD_DIR_ENV: str(directory)}
    )
    hub = HubAPI(None)
    try:
        environ = hub.environ
        # Not yet known: asked again until it is, or until the session stops.
        assert insession.hub_image_digest(environ) is None
        stopping = threading.Event()
        stopping.set()
        ask = functools.partial(insession.hub_image_digest, environ)
        assert not insession.watch_image_digest(directory, ask, stopping, wait=5, every=0.1)
        hub.digest = f"sha256:{DIGEST}"
        assert insession.hub_image_digest(environ) == DIGEST
        assert insession.watch_image_digest(directory, ask, threading.Event(), 5, 0.1)
        assert hub.asked[-1] == "/hub/api/users/alice"
        image = graph(written(directory))["#runtime"]
        assert image["sha256"] == DIGEST and "imageID" in image["description"]
        # Once there, never asked for or written again.
        asked = len(hub.asked)
        assert not insession.watch_image_digest(directory, ask, threading.Event(), 5, 0.1)
        assert not insession.add_image_digest(directory, "b" * 64)
        assert len(hub.asked) == asked
        # A wrong token, a bad digest, no hub: nothing.
        assert insession.hub_image_digest({**environ, "JUPYTERHUB_API_TOKEN": "other"}) is None
        hub.digest = "sha256:not-a-digest"
        assert insession.hub_image_digest(environ) is None
        assert insession.hub_image_digest({**environ, "JUPYTERHUB_API_URL": "file:///etc"}) is None
        assert insession.hub_image_digest({}) is None
    finally:
        hub.close()
    # A local environment's record never asks.
    local = tmp_path / "local"
    facts = RecordFacts(STARTED, Runtime("environment", "/e", "c" * 64))
    insession.start(
        {RECORD_ENV: record_text(session_record(plan, facts)), RECORD_DIR_ENV: str(local)}
    )
    assert not insession.needs_image_digest(local)
    assert not insession.add_image_digest(local, DIGEST)


class RunHub(http.server.BaseHTTPRequestHandler):
    """The hub's ``casa-runs/<user>/<run>/image``: 202, then the digest, to one key alone."""

    digest: str | None = None
    asked: list[str] = []

    def do_GET(self) -> None:
        RunHub.asked.append(self.path)
        if self.headers.get(RUN_IMAGE_KEY_HEADER) != "the-key":
            status, body = 404, {"status": 404, "message": "There is no such run."}
        elif RunHub.digest is None:
            status, body = 202, {"message": "The run's container has not started yet."}
        else:
            status, body = 200, {"digest": RunHub.digest}
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(json.dumps(body).encode())

    def log_message(self, *args: object) -> None:
        pass


def test_a_kubernetes_run_asks_the_hub_for_its_digest_with_its_key(
    tmp_path: Path,
    catalog: Catalog,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    plan, _ = alice_plan(tmp_path, catalog)
    facts = RecordFacts(STARTED, Runtime("image", IMAGE))
    record = record_text(run_record(plan, facts, "/d/restore.py", "e" * 64, ()))
    run_dir = tmp_path / "run"
    insession.start({RECORD_ENV: record, RECORD_DIR_ENV: str(run_dir)})
    monkeypatch.setattr(run_job, "DIGEST_WAIT", 0.5)
    monkeypatch.setattr(run_job, "DIGEST_EVERY", 0.1)
    RunHub.digest, RunHub.asked = None, []
    with serving(RunHub) as base:
        url = f"{base}/hub/api/casa-runs/alice/20261206T021500Z-restore/image"
        environ = {RUN_IMAGE_URL_ENV: url, RUN_IMAGE_KEY_ENV: "the-key"}
        # Not running yet, a wrong key, no key: nothing; the run goes on by its tag.
        assert insession.run_image_digest(environ) is None
        assert insession.run_image_digest({**environ, RUN_IMAGE_KEY_ENV: "other"}) is None
        assert insession.run_image_digest({RUN_IMAGE_URL_ENV: url}) is None
        run_job.note_image_digest(run_dir, environ, -1, threading.Event())
        assert "names the image by its tag" in capfd.readouterr().out
        assert insession.needs_image_digest(run_dir)
        # Once the kubelet runs it, the record names the digest.
        RunHub.digest = f"sha256:{DIGEST}"
        assert insession.run_image_digest(environ) == DIGEST
        run_job.note_image_digest(run_dir, environ, -1, threading.Event())
        assert "names the image by its digest" in capfd.readouterr().out
        assert RunHub.asked[-1] == "/hub/api/casa-runs/alice/20261206T021500Z-restore/image"
    image = graph(written(run_dir))["#runtime"]
    assert image["sha256"] == DIGEST, image
    # The command without a hub puts the kubelet's digest there after the run; once only.
    after = tmp_path / "after"
    insession.start({RECORD_ENV: record, RECORD_DIR_ENV: str(after)})
    assert run_job.main({}, ["digest", str(after), "not-a-digest"]) == 1
    assert run_job.main({}, ["digest", str(after), "b" * 64]) == 0
    assert run_job.main({}, ["digest", str(after), "c" * 64]) == 0
    assert graph(written(after))["#runtime"]["sha256"] == "b" * 64
    # A run stopped while it waits for the digest (the hub gone) stops waiting at once.
    waiting = tmp_path / "waiting"
    insession.start({RECORD_ENV: record, RECORD_DIR_ENV: str(waiting)})
    stopping = threading.Event()
    threading.Timer(0.5, stopping.set).start()
    monkeypatch.setattr(run_job, "DIGEST_WAIT", 30.0)
    began = time.monotonic()
    run_job.note_image_digest(waiting, environ, -1, stopping)
    assert time.monotonic() - began < 5 and insession.needs_image_digest(waiting)
    assert "names the image by its tag" not in capfd.readouterr().out

"""The spawn form's headless runs: the hub's pages under ``/hub/casa-runs/``.

The form's *Run headless* button sends its dataset, size, release and script with GET to
``casa-runs/new``, which shows what would run (dataset, CASA build, exact or approximate and
why, script) with a Start button. Start (a POST with the hub's xsrf) starts the run and leads
to ``casa-runs/<id>``: its status and sentence, the tail of its output while it runs, where its
outputs and record are, and Stop. ``casa-runs`` lists the user's runs.

The pages are the hub's own (``JupyterHub.extra_handlers``): they need the user's hub login and
their spawner, whose account mapping, storage and CASA environments a run shares with their
sessions. Who may run what stays with a :class:`RunsBackend`, chosen by the spawner: on one
machine :class:`~casaspawner.local.formruns.LocalRuns`, which runs everything as the user's own
account; on Kubernetes :class:`~casaspawner.kube.formruns.KubeRuns`, whose Jobs the hub creates.
A user reaches only their own runs: ids are looked up among their own runs alone.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from jinja2 import Environment, PackageLoader, select_autoescape
from jupyterhub.apihandlers import APIHandler
from jupyterhub.handlers import BaseHandler
from jupyterhub.utils import url_path_join
from tornado import web

from casaspawner.errors import CasaspawnerError, InvalidInput
from casaspawner.runtime import RUN_IMAGE_KEY_HEADER, RUNS_API

#: The script the form offers: ALMA's restore.
DEFAULT_SCRIPT = "scriptForPI.py"
#: The pages' path under the hub's prefix.
RUNS_PATH = "casa-runs"
#: A run id in a page's path (the worker checks it again).
RUN_ID = r"[0-9]{8}T[0-9]{6}Z-[A-Za-z0-9._-]{1,70}"
RUN_ID_PATTERN = f"({RUN_ID})"
NO_RUN = "There is no such run."
#: Longest text a field takes.
FIELD_LIMIT = 1024
#: Seconds between two loads of a running run's page (each one runs a worker as the user).
REFRESH_SECONDS = 5
#: The form's fields a run takes.
FIELDS = ("dataset", "script", "size", "release")
UNEXPECTED = "The run could not be {what} because of a problem on the hub; its log says why."
_TEMPLATES = Environment(
    loader=PackageLoader("casaspawner.services", "templates"),
    autoescape=select_autoescape(default=True, default_for_string=True),
    trim_blocks=True,
    lstrip_blocks=True,
)


class RunsBackend(Protocol):
    """Where one user's headless runs run: this machine, or Kubernetes Jobs."""

    async def preview(
        self, dataset: str, script: str, size: str, release: str
    ) -> dict[str, Any]: ...

    async def start(self, dataset: str, script: str, size: str, release: str) -> str: ...

    async def runs(self) -> list[dict[str, Any]]: ...

    async def show(self, run_id: str) -> dict[str, Any]: ...

    async def stop(self, run_id: str) -> dict[str, Any]: ...


@dataclass(frozen=True)
class RunRequest:
    """What the form asks to run, checked for shape."""

    dataset: str
    script: str = DEFAULT_SCRIPT
    size: str = ""
    release: str = ""

    def query(self) -> dict[str, str]:
        """The request as the form's fields."""
        return {
            "dataset": self.dataset,
            "script": self.script,
            "size": self.size,
            "release": self.release,
        }


def run_request(field: Callable[[str], str]) -> RunRequest:
    """The run the form asks for; bad input is one :class:`InvalidInput` sentence."""
    values = {name: field(name).strip() for name in FIELDS}
    for name, value in values.items():
        if len(value) > FIELD_LIMIT or any(ord(c) < 32 for c in value):
            raise InvalidInput(f"The {name} field is too long or holds control characters.")
    if not values["dataset"]:
        raise InvalidInput(
            "Name the dataset on the form (its directory in your storage) to run a script in "
            "its CASA build."
        )
    if values["script"].startswith("-"):
        raise InvalidInput("Give the script's name or path, not an option.")
    return RunRequest(
        values["dataset"], values["script"] or DEFAULT_SCRIPT, values["size"], values["release"]
    )


def backend_for(spawner: Any) -> RunsBackend:
    """The runs backend of the user's spawner; one sentence where there is none."""
    from casaspawner.kube.formruns import KubeRuns
    from casaspawner.kube.spawner import CASASpawner
    from casaspawner.local.formruns import LocalRuns
    from casaspawner.local.spawner import LocalCASASpawner

    if isinstance(spawner, LocalCASASpawner):
        return LocalRuns(spawner)
    if isinstance(spawner, CASASpawner):
        return KubeRuns(spawner)
    raise InvalidInput(
        "This hub does not start headless runs from the form; run casaspawner run in a session."
    )


def build_description(found: dict[str, Any]) -> str:
    """The preview's one line about the CASA build: exact, approximate or chosen, and why."""
    if found.get("approximate"):
        kind = "an approximation, not the exact build"
    elif found.get("exact"):
        kind = "the exact build"
    else:
        kind = "not the exact build"
    return f"{found.get('label', '')}: {kind}."


class RunsHandler(BaseHandler):  # type: ignore[misc]
    """A page of the user's headless runs, with errors as one sentence."""

    def runs_url(self, *parts: str) -> str:
        return str(url_path_join(self.hub.base_url, RUNS_PATH, *parts))

    def backend(self) -> RunsBackend:
        return backend_for(self.current_user.spawner)

    def page(self, name: str, status: int = 200, **values: Any) -> None:
        self.set_status(status)
        self.set_header("Cache-Control", "no-store")
        self.finish(
            _TEMPLATES.get_template(name).render(
                user=self.current_user.name,
                runs_url=self.runs_url(),
                spawn_url=url_path_join(self.hub.base_url, "spawn"),
                xsrf_form_html=self.xsrf_form_html(),
                **values,
            )
        )

    def failed(self, exc: Exception, what: str) -> tuple[int, str]:
        """The status and sentence of a failed action; the unexpected ones go to the log."""
        if isinstance(exc, CasaspawnerError):
            return 400, str(exc)
        self.log.error("Run of %s could not be %s", self.current_user.name, what, exc_info=exc)
        return 500, UNEXPECTED.format(what=what)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        reason = getattr(exc, "log_message", None) or self._reason
        self.finish(
            _TEMPLATES.get_template("error.html").render(status=status_code, reason=reason)
        )


class NewRunPage(RunsHandler):
    """``GET``: what would run, with Start; ``POST``: start it."""

    @web.authenticated
    async def get(self) -> None:
        await self.show_or_start(self.get_query_argument, start=False)

    @web.authenticated
    async def post(self) -> None:
        await self.show_or_start(self.get_body_argument, start=True)

    async def show_or_start(self, argument: Callable[[str, str], str], start: bool) -> None:
        """The preview, or the run started; an error keeps what was typed, to correct it."""
        typed = {
            name: "".join(c for c in argument(name, "") if ord(c) >= 32).strip()[:FIELD_LIMIT]
            for name in FIELDS
        }
        typed["script"] = typed["script"] or DEFAULT_SCRIPT
        request = None
        try:
            request = run_request(lambda name: argument(name, ""))
            if start:
                run_id = await self.backend().start(**request.query())
            else:
                found = await self.backend().preview(**request.query())
        except Exception as exc:
            status, error = self.failed(exc, "started" if start else "prepared")
            self.page("run_new.html", status, request=request, typed=typed, error=error)
            return
        if start:
            self.redirect(self.runs_url(run_id))
        else:
            self.page("run_new.html", request=request, found=found, build=build_description(found))


class RunPage(RunsHandler):
    """One run: status, sentence, output's tail, files, and Stop while it runs."""

    @web.authenticated
    async def get(self, run_id: str) -> None:
        try:
            run = await self.backend().show(run_id)
        except Exception as exc:
            status, error = self.failed(exc, "shown")
            self.page("run.html", status, run=None, error=error)
            return
        running = run.get("status") == "running"
        if running:
            self.set_header("Refresh", str(REFRESH_SECONDS))
        self.page("run.html", run=run)


class StopRun(RunsHandler):
    """Stop a run and go back to its page."""

    @web.authenticated
    async def post(self, run_id: str) -> None:
        try:
            await self.backend().stop(run_id)
        except Exception as exc:
            status, error = self.failed(exc, "stopped")
            self.page("run.html", status, run=None, error=error)
            return
        self.redirect(self.runs_url(run_id))


class RunsPage(RunsHandler):
    """The user's runs, newest first."""

    @web.authenticated
    async def get(self) -> None:
        try:
            runs = await self.backend().runs()
        except Exception as exc:
            status, error = self.failed(exc, "listed")
            self.page("runs.html", status, runs=[], error=error)
            return
        self.page("runs.html", runs=runs)


class RunImageHandler(APIHandler):  # type: ignore[misc]
    """A Kubernetes run's image digest, for the run's own pod alone.

    ``GET /hub/api/casa-runs/<user>/<run id>/image`` with the key the hub put in the pod's spec
    (the ``X-Casaspawner-Run-Key`` header) answers ``{"digest": "sha256:…"}`` once the kubelet
    runs the image, and 202 before. The key is checked before anything is looked up: anyone
    else gets 404, the same for a wrong key and a run that is not there. The pod then names
    its image by digest in the run's record.
    """

    async def get(self, user_name: str, run_id: str) -> None:
        from casaspawner.kube.formruns import KubeRuns, run_image_key
        from casaspawner.kube.spawner import CASASpawner

        key = self.request.headers.get(RUN_IMAGE_KEY_HEADER, "")
        expected = run_image_key(self.settings["cookie_secret"], user_name, run_id)
        if not hmac.compare_digest(expected.encode(), key.encode()):
            raise web.HTTPError(404, NO_RUN)
        user = self.find_user(user_name)
        spawner = user.spawner if user is not None else None
        if not isinstance(spawner, CASASpawner):
            raise web.HTTPError(404, NO_RUN)
        try:
            digest = await KubeRuns(spawner).image_digest(run_id)
        except InvalidInput:
            raise web.HTTPError(404, NO_RUN) from None
        except CasaspawnerError as exc:
            raise web.HTTPError(503, str(exc)) from None
        if digest is None:
            self.set_status(202)
            self.write({"message": "The run's container has not started yet."})
            return
        self.write({"digest": digest})


def run_handlers() -> list[tuple[str, type[BaseHandler]]]:
    """The pages and the runs' API, for ``JupyterHub.extra_handlers`` (under the hub's prefix)."""
    return [
        (f"/{RUNS_PATH}/?", RunsPage),
        (f"/{RUNS_PATH}/new", NewRunPage),
        (f"/{RUNS_PATH}/{RUN_ID_PATTERN}", RunPage),
        (f"/{RUNS_PATH}/{RUN_ID_PATTERN}/stop", StopRun),
        (f"/api/{RUNS_API}/(?P<user_name>[^/]+)/(?P<run_id>{RUN_ID})/image", RunImageHandler),
    ]

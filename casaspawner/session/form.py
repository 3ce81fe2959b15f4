"""The spawn form: an HTML fragment JupyterHub wraps in its own form."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape

from casaspawner.catalog.model import Release
from casaspawner.plan import INTERFACES, Resources
from casaspawner.session.relaunch import RELAUNCH_KEY, PastSession

_TEMPLATES = Environment(
    loader=PackageLoader("casaspawner.session", "templates"),
    autoescape=select_autoescape(default=True, default_for_string=True),
    trim_blocks=True,
    lstrip_blocks=True,
)


def render_form(
    *,
    releases: Sequence[Release],
    sizes: Mapping[str, Resources],
    default_size: str,
    previous: Mapping[str, Any],
    recent: Sequence[str],
    last: Mapping[str, Any] | None,
    past: Sequence[PastSession] = (),
    suggested: Sequence[str] = (),
    blocked: Collection[str] = (),
    allow_override: bool = True,
    can_read_paths: bool = False,
    home: str = "~",
    runs_url: str = "",
    error: str = "",
) -> str:
    """Render the form, preselecting what the user chose last time.

    ``releases`` are the catalog's runnable releases; those in ``blocked`` (drained now) are
    left out of the override list. ``last`` is the last resolution the form names as the
    recommended release. ``suggested`` datasets are offered to a user who has named none yet;
    the first fills the field and is the help's example. ``past`` sessions, newest first, are
    offered to relaunch exactly. With ``runs_url``, a *Run headless* part sends the form's
    dataset, size, release and a script there with GET instead of starting a session.
    """
    resolved = None
    if last:
        resolved = next((r for r in releases if r.id == last.get("release")), None)
    size = previous.get("size") if previous.get("size") in sizes else default_size
    interface = previous.get("interface") if previous.get("interface") in INTERFACES else "lab"
    offered = [r for r in releases if r.id not in blocked] if allow_override else []
    chosen = (
        previous.get("release") if previous.get("release") in {r.id for r in offered} else None
    )
    dataset = previous.get("dataset")
    if not isinstance(dataset, str):
        dataset = "" if recent or not suggested else suggested[0]
    return _TEMPLATES.get_template("spawn_form.html").render(
        dataset=dataset,
        recent=recent,
        suggested=[] if recent else suggested,
        example=suggested[0] if suggested else f"{home}/data/2019.1.00001.S",
        interfaces=INTERFACES,
        interface=interface,
        sizes=sizes,
        size=size,
        releases=offered,
        chosen=chosen,
        resolved=resolved,
        resolved_dataset=(last or {}).get("dataset", ""),
        past=past,
        relaunch=previous.get(RELAUNCH_KEY) if isinstance(previous.get(RELAUNCH_KEY), str) else "",
        can_read_paths=can_read_paths,
        home=home,
        runs_url=runs_url,
        error=error,
    )

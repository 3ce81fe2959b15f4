"""LocalCASASpawner's own decisions, without a hub: the plan's paths, identity, storage ownership,
the session process's first steps (its log, ~/arc), and refusing or approximating a release this
machine cannot install (the operator's ``allow_approximate``)."""

from __future__ import annotations

import ast
import asyncio
import dataclasses
import grp
import http.server
import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from casaspawner.catalog.model import Release, load_catalog
from casaspawner.datasets.resolve import resolve_path
from casaspawner.datasets.synth import write_dataset
from casaspawner.errors import CasaspawnerError
from casaspawner.local import demo
from casaspawner.local.accounts import GroupRegistry, ensure_group
from casaspawner.local.demo import as_owner_of
from casaspawner.local.spawner import LocalCASASpawner
from casaspawner.plan import Identity

# As root, the first use creates the local account jupyter-demo.
pytestmark = pytest.mark.integration
ROOT = os.geteuid() == 0


@dataclass
class Group:
    name: str


class User:
    """The parts of JupyterHub's User a spawner reads before it starts."""

    name = "demo"
    groups: list[Any] = []
    url = "/user/demo/"
    state = None

    async def get_auth_state(self) -> None:
        return None


def spawner(storage: Path, **traits: Any) -> LocalCASASpawner:
    traits = {
        "storage_root": str(storage),
        "tarball_mirror": "http://127.0.0.1:9/",
        "probe_timeout": 2,
        **traits,
    }
    return LocalCASASpawner(user=User(), **traits)


@pytest.fixture
def storage() -> Iterator[Path]:
    """``/tmp/…/arc``: in a directory every user can search (pytest's own are private to root),
    because processes of the session's local account enter it."""
    base = Path(tempfile.mkdtemp(prefix="casaspawner-spawner-tests-", dir="/tmp"))
    base.chmod(0o755)
    home = base / "arc" / "home" / "demo"
    # CASA 6.5.4-9, pipeline 2023.1.0.124: a tarball-only build.
    write_dataset(home, era="cycle10")
    try:
        yield base / "arc"
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_unreachable_exact_build_is_refused_with_the_reason(storage: Path) -> None:
    local = spawner(storage)
    with pytest.raises(Exception) as caught:
        asyncio.run(local.prepare_session({"dataset": "~/2023.1.00026.S", "interface": "desktop"}))
    message = getattr(caught.value, "jupyterhub_message", str(caught.value))
    assert message.startswith(
        "CASA 6.5.4-9 (pipeline 2023.1.0.124) cannot be installed on this hub: its tarball "
        "http://127.0.0.1:9/casa-6.5.4-9-pipeline-2023.1.0.124-py3.8.tar.xz is unreachable ("
    ), message
    assert message.endswith(".") and "\n" not in message


def test_approximation_when_allowed_is_marked_everywhere(storage: Path) -> None:
    local = spawner(storage, allow_approximate=True)
    plan = asyncio.run(
        local.prepare_session({"dataset": "~/2023.1.00026.S", "interface": "desktop"})
    )
    assert plan.approximate and not plan.exact
    assert plan.release.role == "modular"
    assert plan.kernel_name.endswith(" (approximate)")
    assert plan.reason.endswith("(the dataset calls for CASA 6.5.4-9 (pipeline 2023.1.0.124)).")
    local.apply_plan(plan)
    local.record_session(plan)
    assert local.user_options["profile"].endswith("approximate")
    assert local.user_options["casaspawner"]["approximate"] is True
    assert local.environment["CASASPAWNER_APPROXIMATE"] == "true"
    assert local.environment["CASASPAWNER_REASON"] == plan.reason
    xstartup = Path(local.environment["JUPYTER_REMOTE_DESKTOP_PROXY_XSTARTUP"])
    assert xstartup == local.desktop_dir() / "xstartup"
    assert local.default_url == "/desktop/"


def test_an_approximation_is_checked_against_drained_releases(storage: Path) -> None:
    options = {"dataset": "~/2023.1.00026.S", "interface": "desktop"}
    nearest = asyncio.run(
        spawner(storage, allow_approximate=True).prepare_session(options)
    ).release
    drained = spawner(storage, allow_approximate=True, blocked_releases=[nearest.id])
    with pytest.raises(Exception) as caught:
        asyncio.run(drained.prepare_session(options))
    message = getattr(caught.value, "jupyterhub_message", str(caught.value))
    assert message == (
        f"{nearest.label} cannot be started right now; try again later or choose another release."
    )


@pytest.mark.skipif(not ROOT, reason="only a hub running as root changes the session's identity")
def test_the_session_process_runs_as_the_plans_uid_gid_and_groups(storage: Path) -> None:
    local = spawner(storage, allow_approximate=True)
    plan = asyncio.run(local.prepare_session({"dataset": "~/2023.1.00026.S"}))
    # Ids no account has: the process gets them from the plan, not from a look-up by name.
    identity = Identity("demo", 54321, 54322, ("proj",), (54323,))
    local.session_plan = dataclasses.replace(plan, identity=identity)
    preexec = local.make_preexec_fn("demo")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            preexec()
            ids = [os.getuid(), os.geteuid(), os.getgid(), os.getegid(), sorted(os.getgroups())]
            os.write(write, json.dumps(ids).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as answer:
        seen = json.loads(answer.read())
    os.waitpid(pid, 0)
    assert seen == [54321, 54321, 54322, 54322, [54323]]
    assert local.user_env({})["USER"] == "demo"


def test_the_form_says_what_happens_to_a_build_that_cannot_be_installed(storage: Path) -> None:
    allowed = spawner(storage, allow_approximate=True).render_options_form()
    refused = spawner(storage, allow_approximate=False).render_options_form()
    assert (
        "the session runs the nearest installable release and is marked "
        "<strong>approximate</strong>." in allowed
    )
    assert (
        "a dataset whose exact build cannot be installed here is refused with the reason."
        in refused
    )
    assert "approximate" not in refused


def test_no_sizes_are_offered_because_none_are_enforced(
    storage: Path, demo_release: Release
) -> None:
    local = spawner(storage)
    form = local.render_options_form()
    assert 'id="casa-size"' not in form and "Session size" not in form
    write_dataset(storage / "home" / "demo", spec=demo.demo_spec(demo_release))
    plan = asyncio.run(
        local.prepare_session({"dataset": f"~/{demo.DEMO_PROJECT}", "size": "medium"})
    )
    assert plan.options.size == "machine", "a size saved by an earlier hub is ignored, not refused"
    several = spawner(
        storage, session_sizes={"a": {"cpu_limit": 1}, "b": {"cpu_limit": 2}}, default_size="a"
    )
    assert 'id="casa-size"' in several.render_options_form()


def test_the_local_form_leaves_out_drained_releases(storage: Path) -> None:
    """The same form renderer as for pods: what the drain service blocks now is not offered."""

    async def drain(spawner: Any) -> dict[str, str]:
        return {"casa-6.7.0-31": "being replaced"}

    for blocked in (drain, ["casa-6.7.0-31"]):
        local = spawner(storage, blocked_releases=blocked)
        form = asyncio.run(local.options_form(local))
        assert 'value="casa-6.7.0-31"' not in form and 'value="casa-6.6.5-31"' in form, blocked


def test_the_form_renders_after_any_failed_spawn(storage: Path) -> None:
    """JupyterHub keeps a failed spawn's options; a later form shows no preview for them, never a
    traceback."""
    local = spawner(storage)
    for dataset in ("a" * 300, "~/nothing-here", "/etc"):
        local.user_options = {"dataset": dataset}
        form = asyncio.run(local.options_form(local))
        assert 'name="dataset"' in form and 'id="casa-resolved"' not in form, dataset


def test_configuration_errors_name_this_spawner(storage: Path) -> None:
    local = spawner(storage, default_size="huge")
    with pytest.raises(Exception) as caught:
        asyncio.run(local.prepare_session({"dataset": "~/2023.1.00026.S"}))
    assert caught.value.jupyterhub_message == (  # type: ignore[attr-defined]
        "The hub's configuration is invalid: LocalCASASpawner.default_size is 'huge', which is "
        "not one of LocalCASASpawner.session_sizes (machine)."
    )


def test_the_form_names_the_home_as_the_session_sees_it(storage: Path) -> None:
    form = spawner(storage).render_options_form()
    assert "<code>~/data/2019.1.00001.S</code>" in form and str(storage) not in form
    at_arc = spawner(Path("/arc")).render_options_form()
    assert "<code>/arc/home/demo/data/2019.1.00001.S</code>" in at_arc


def test_a_new_user_is_offered_the_suggested_dataset_and_a_returning_one_their_own(
    storage: Path,
) -> None:
    import html.parser

    class Form(html.parser.HTMLParser):
        def __init__(self, text: str) -> None:
            super().__init__()
            self.value: str | None = None
            self.offered: list[str] = []
            self.feed(text)

        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            found = dict(attrs)
            if tag == "input" and found.get("id") == "casa-dataset":
                self.value = found.get("value")
            if tag == "button" and "data-dataset" in found:
                self.offered.append(found["data-dataset"] or "")

    new = spawner(storage, suggested_datasets=["~/2023.1.01234.S", "~/other"])
    text = new.render_options_form()
    form = Form(text)
    assert (form.value, form.offered) == ("~/2023.1.01234.S", ["~/2023.1.01234.S", "~/other"])
    assert "Suggested:" in text and "e.g. <code>~/2023.1.01234.S</code>" in text
    returning = spawner(storage, suggested_datasets=["~/2023.1.01234.S"])
    returning.recent_datasets = ["~/mine"]
    returning.user_options = {"dataset": "~/mine"}
    text = returning.render_options_form()
    form = Form(text)
    assert (form.value, form.offered) == ("~/mine", ["~/mine"]) and "Recently used:" in text
    # Without suggestions, as before.
    form = Form(spawner(storage).render_options_form())
    assert (form.value, form.offered) == ("", [])


def test_plan_paths_are_local_paths_and_identity_is_never_root(
    storage: Path, demo_release: Release
) -> None:
    local = spawner(storage)
    # Installable here.
    write_dataset(storage / "home" / "demo", spec=demo.demo_spec(demo_release))
    plan = asyncio.run(
        local.prepare_session({"dataset": f"{storage}/home/demo/{demo.DEMO_PROJECT}"})
    )
    local.apply_plan(plan)
    assert plan.exact and not plan.approximate
    assert plan.home == str(storage / "home" / "demo")
    assert local.environment["HOME"] == plan.home and local.notebook_dir == plan.home
    assert plan.identity.uid != 0
    if os.geteuid() == 0:
        account = pwd.getpwnam("jupyter-demo")
        assert (plan.identity.uid, plan.identity.gid) == (account.pw_uid, account.pw_gid)
    else:
        assert plan.identity.uid == os.getuid()


def test_form_previews_the_last_dataset_and_says_it_will_be_approximate(storage: Path) -> None:
    local = spawner(storage, allow_approximate=True)
    # Nothing to preview on a first visit.
    assert asyncio.run(local.resolution_preview()) == ""
    local.user_options = {"dataset": "~/2023.1.00026.S"}
    assert asyncio.run(local.resolution_preview()) == "", (
        "a dataset never resolved is not previewed"
    )
    asyncio.run(local.prepare_session({"dataset": "~/2023.1.00026.S", "interface": "desktop"}))
    preview = asyncio.run(local.resolution_preview())
    assert preview.startswith(
        '<p class="casa-help" id="casa-resolved" role="status">~/2023.1.00026.S: CASA 6.5.4-9'
    )
    assert "cannot be installed on this hub" in preview
    assert preview.rstrip().endswith(
        "The session will run the nearest installable release, marked approximate.</p>"
    )
    # the preview comes from the server's state, so it survives a hub restart
    restarted = spawner(storage, allow_approximate=True)
    restarted.load_state(json.loads(json.dumps(local.get_state())))
    restarted.user_options = {"dataset": "~/2023.1.00026.S"}
    assert asyncio.run(restarted.resolution_preview()) == preview


def test_sessions_read_the_desktop_files_from_the_cache_not_the_checkout(storage: Path) -> None:
    from casaspawner.local.environments.pythons import world_usable
    from casaspawner.local.environments.session_files import DESKTOP_SOURCE, LAB_OVERRIDES

    local = spawner(storage)
    desktop = local.desktop_dir()
    assert desktop.is_relative_to(Path(local.environments_dir)) and not desktop.is_relative_to(
        DESKTOP_SOURCE
    )
    for name in ("xstartup", "casa-app", "casa-notices", "bin/vncserver"):
        assert (desktop / name).read_bytes() == (DESKTOP_SOURCE / name).read_bytes(), name
        assert (desktop / name).stat().st_mode & 0o777 == 0o755, name
        if ROOT:
            # Sessions of other users run them.
            assert world_usable(desktop / name), name
    overrides = (desktop.parent / "lab-settings" / "overrides.json").read_text()
    assert overrides == LAB_OVERRIDES.read_text(), (
        "the wheel's overrides.d file, not a second copy"
    )
    assert json.loads(overrides) == {
        "@jupyterlab/apputils-extension:notification": {"fetchNews": "false"}
    }
    assert spawner(storage).desktop_dir() == desktop, "installed once per content"


def test_project_directories_belong_to_the_project_group(
    storage: Path, demo_release: Release
) -> None:
    write_dataset(storage / "home" / "demo", spec=demo.demo_spec(demo_release))

    class ProjectUser(User):
        # A name that cannot be a directory (CADC-style) is skipped, not a reason to refuse the
        # session.
        groups = [Group("alma-team"), Group("ivo://cadc.nrc.ca/gms?alma")]

    local = LocalCASASpawner(
        user=ProjectUser(), storage_root=str(storage), tarball_mirror="http://127.0.0.1:9/"
    )
    try:
        plan = asyncio.run(local.prepare_session({"dataset": f"~/{demo.DEMO_PROJECT}"}))
        assert plan.identity.groups == ("alma-team",)
        local._prepare_directories(plan, plan.identity.uid, plan.identity.gid)
        project = os.lstat(storage / "projects" / "alma-team")
        assert stat.S_ISDIR(project.st_mode)
        if ROOT:
            group = grp.getgrnam("casa-alma-team")
            assert plan.identity.supplemental_gids == (group.gr_gid,)
            assert "jupyter-demo" in group.gr_mem
            assert (project.st_uid, project.st_gid, stat.S_IMODE(project.st_mode)) == (
                0,
                group.gr_gid,
                0o2770,
            )
        else:
            assert project.st_uid == os.getuid()
        home = os.lstat(plan.home)
        assert home.st_uid == plan.identity.uid
        if ROOT:
            assert stat.S_IMODE(home.st_mode) == 0o750
    finally:
        if ROOT:
            subprocess.run(["groupdel", "casa-alma-team"], capture_output=True)


def message(caught: pytest.ExceptionInfo[BaseException]) -> str:
    return str(getattr(caught.value, "jupyterhub_message", caught.value))


@pytest.mark.skipif(not ROOT, reason="only a hub running as root reads datasets as another user")
def test_a_root_hub_reads_datasets_as_the_user_and_nothing_the_user_cannot(storage: Path) -> None:
    """The dataset's pipeline manifest is a file only root may read (as one in another user's tree
    would be): the hub, resolving as the user, reads nothing there and resolves by what the user
    can read (its CASA log)."""
    home = storage / "home" / "demo"
    member = write_dataset(home / "guarded", era="cycle10")
    manifest = next(member.rglob("*pipeline_manifest.xml"))
    os.chown(manifest, 0, 0)
    manifest.chmod(0o600)
    (member / "log").mkdir(exist_ok=True)
    (member / "log" / "casa-20250101-000000.log").write_text("INFO CASA Version CASA 6.6.5-31\n")
    assert resolve_path(member, load_catalog()).release.id == "pl-2023.1.0.124", (
        "root alone reads it"
    )

    plan = asyncio.run(
        spawner(storage).prepare_session({"dataset": "~/guarded", "interface": "desktop"})
    )
    assert plan.resolution.release.id == "casa-6.6.5-31", plan.resolution
    assert plan.resolution.evidence.kind == "casalog" and plan.resolution.dataset == "~/guarded"
    assert plan.resolution.evidence.path == str(
        (member / "log" / "casa-20250101-000000.log").relative_to(home / "guarded")
    )


@pytest.mark.skipif(not ROOT, reason="only a hub running as root reads datasets as another user")
def test_a_root_hub_words_a_bad_dataset_as_the_resolver_in_the_hub_does(storage: Path) -> None:
    """Read as the user, a dataset that is not one gets the very sentence the hub's own resolver
    gives; one that tells no version still runs the release the user chose."""
    home = storage / "home" / "demo"
    (home / "empty").mkdir()
    write_dataset(home / "two" / "a", era="cycle10")
    write_dataset(home / "two" / "b", era="cycle7")
    silent = write_dataset(home / "silent", era="no-evidence")
    catalog = load_catalog()
    # What is no directory at all, the storage reader words (in the hub).
    for name in ("empty", "two", "silent"):
        with pytest.raises(CasaspawnerError) as expected:
            resolve_path(home / name, catalog, label=f"~/{name}")
        with pytest.raises(Exception) as caught:
            asyncio.run(spawner(storage).prepare_session({"dataset": f"~/{name}"}))
        assert message(caught) == str(expected.value), name
    chosen = asyncio.run(
        spawner(storage).prepare_session(
            {
                "dataset": f"~/silent/{silent.relative_to(home / 'silent')}",
                "release": "casa-6.6.5-31",
            }
        )
    )
    assert chosen.release.id == "casa-6.6.5-31" and chosen.resolution.evidence.kind == "none"
    assert (
        chosen.reason.startswith("Nothing in ~/silent/")
        and "you chose CASA 6.6.5-31" in chosen.reason
    )


def test_reading_a_dataset_has_a_time_limit(storage: Path) -> None:
    with pytest.raises(Exception) as caught:
        asyncio.run(
            spawner(storage, resolve_timeout=0.01).prepare_session({"dataset": "~/2023.1.00026.S"})
        )
    assert message(caught) == (
        "Reading ~/2023.1.00026.S took longer than 0.01 seconds; give the directory of one ALMA "
        "dataset (a member.uid___… directory)."
    )


@pytest.mark.skipif(
    not ROOT, reason="only a hub running as root creates local accounts and groups"
)
def test_users_of_a_new_project_spawning_together_get_one_group(storage: Path) -> None:
    """First spawns of several users of a project nobody used yet, at once (each hub request
    creates accounts and groups from a worker thread): one local group, every account in it, no
    useradd/groupadd/usermod failure ("groupadd: group … already exists", "cannot lock
    /etc/group")."""
    tag = os.urandom(3).hex()
    project = f"race-{tag}"

    def racer(n: int) -> LocalCASASpawner:
        class RaceUser(User):
            name = f"race-{tag}-{n}"
            groups = [Group(project)]
            url = f"/user/race-{tag}-{n}/"

        return LocalCASASpawner(user=RaceUser(), storage_root=str(storage))

    spawners = [racer(n) for n in range(6)]

    async def together() -> list[Any]:
        return list(await asyncio.gather(*(s.session_identity() for s in spawners)))

    try:
        identities = asyncio.run(together())
        group = grp.getgrnam(f"casa-{project}")
        assert {identity.supplemental_gids for identity in identities} == {(group.gr_gid,)}
        assert sorted(group.gr_mem) == sorted(s.system_username() for s in spawners)
        assert len({identity.uid for identity in identities}) == len(spawners)
    finally:
        for local in spawners:
            subprocess.run(["userdel", local.system_username()], capture_output=True)
        subprocess.run(["groupdel", f"casa-{project}"], capture_output=True)


@pytest.mark.skipif(
    not ROOT, reason="only a hub running as root creates local accounts and groups"
)
def test_a_group_that_cannot_be_joined_is_one_sentence(tmp_path: Path) -> None:
    name = f"casa-nobody-{os.urandom(3).hex()}"
    registry = GroupRegistry(tmp_path / "groups.json")
    try:
        with pytest.raises(CasaspawnerError) as caught:
            ensure_group(name, "nobody-project", "jupyter-no-such-account", registry)
        assert str(caught.value) == (
            f"jupyter-no-such-account could not be added to the local group {name}: usermod: user "
            "'jupyter-no-such-account' does not exist."
        )
    finally:
        subprocess.run(["groupdel", name], capture_output=True)


def test_a_users_own_mode_of_their_home_is_kept(storage: Path, demo_release: Release) -> None:
    """The hub gives the home its mode when it creates or takes it over; a user who then makes it
    private (``chmod 700``) keeps that on every later spawn."""
    write_dataset(storage / "home" / "demo", spec=demo.demo_spec(demo_release))
    local = spawner(storage)
    plan = asyncio.run(local.prepare_session({"dataset": f"~/{demo.DEMO_PROJECT}"}))
    local.apply_plan(plan)
    home = Path(plan.home)
    local._prepare_directories(plan, plan.identity.uid, plan.identity.gid)
    if ROOT:
        # Written by root above: taken over by the user's account.
        assert (home.stat().st_uid, stat.S_IMODE(home.stat().st_mode)) == (
            plan.identity.uid,
            0o750,
        )
    scratch = Path(local.environment["SCRATCH"])
    assert stat.S_IMODE(scratch.stat().st_mode) == 0o700, "created by the hub: its mode"
    as_owner_of(home, os.chmod, home, 0o700)
    as_owner_of(home, os.chmod, scratch, 0o750)
    local._prepare_directories(plan, plan.identity.uid, plan.identity.gid)
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    assert stat.S_IMODE(scratch.stat().st_mode) == 0o750


def test_the_session_opens_its_log_itself_never_through_a_link(
    storage: Path, tmp_path: Path, demo_release: Release
) -> None:
    """The hub (root) only starts the session process; that process, already the user, opens the
    log with O_NOFOLLOW, so a link planted after the hub's check (a race) cannot lead root
    anywhere; it also adds ~/arc, the storage root at the pods' relative paths."""
    write_dataset(storage / "home" / "demo", spec=demo.demo_spec(demo_release))
    local = spawner(storage)
    plan = asyncio.run(local.prepare_session({"dataset": f"~/{demo.DEMO_PROJECT}"}))
    local.apply_plan(plan)
    uid = plan.identity.uid
    local._prepare_directories(plan, uid, plan.identity.gid)
    home = Path(plan.home)
    log = home / local.session_log_name
    local._session_log = str(log)
    run = ["sh", "-c", "id -u; echo on-stderr >&2"]
    subprocess.run(run, preexec_fn=local.make_preexec_fn("demo"), cwd=home, check=True)
    info = os.lstat(log)
    assert (
        stat.S_ISREG(info.st_mode) and info.st_uid == uid and stat.S_IMODE(info.st_mode) == 0o600
    )
    assert log.read_text() == f"{uid}\non-stderr\n"
    assert os.readlink(home / "arc") == str(storage) and os.lstat(home / "arc").st_uid == uid

    victim = tmp_path / "victim"
    victim.write_text("secret\n")
    victim.chmod(0o600)
    before = victim.stat()
    as_owner_of(home, lambda: (log.unlink(), log.symlink_to(victim)))
    with pytest.raises(subprocess.SubprocessError):
        subprocess.run(run, preexec_fn=local.make_preexec_fn("demo"), cwd=home)
    assert victim.read_text() == "secret\n"
    after = victim.stat()
    assert (after.st_uid, after.st_gid, after.st_mode) == (
        before.st_uid,
        before.st_gid,
        before.st_mode,
    )


def test_the_hub_never_forks_python() -> None:
    """``fork()`` followed by Python code in the child is unsafe in a multi-threaded process such
    as the hub (``asyncio.to_thread`` workers may hold locks): only the single-threaded demo does
    it (``as_owner_of``)."""
    import casaspawner.spawners

    forking = ("fork", "forkpty")
    for module in sorted(Path(casaspawner.spawners.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(module.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in forking:
                raise AssertionError(f"{module.name}:{node.lineno} calls os.{node.attr}")
    assert any(
        isinstance(node, ast.Attribute) and node.attr == "fork"
        for node in ast.walk(ast.parse(Path(demo.__file__).read_text()))
    ), "the check looks for what as_owner_of does"


@pytest.mark.skipif(not ROOT, reason="only a hub running as root can be made to write for a user")
def test_the_demo_writes_the_dataset_as_the_user_and_never_through_their_links(
    storage: Path, demo_release: Release
) -> None:
    # Readable by the user, like the environments cache holding the real MS.
    outside = storage.parent
    home = demo.prepare_home(storage)
    account = pwd.getpwnam("jupyter-demo")
    assert os.lstat(home).st_uid == account.pw_uid
    ms = outside / "stand-in.ms"
    ms.mkdir()
    (ms / "table.dat").write_bytes(b"rows")
    spec = demo.demo_spec(demo_release)

    victim = outside / "elsewhere"
    victim.mkdir(mode=0o700)
    (victim / "keep").write_text("root's\n")
    project = home / demo.DEMO_PROJECT
    # The user points ~/2023.1.01234.S elsewhere.
    as_owner_of(home, project.symlink_to, victim)
    with pytest.raises(CasaspawnerError) as caught:
        as_owner_of(home, demo.write_demo_dataset, home, ms, spec)
    assert "Permission denied" in str(caught.value)
    assert os.listdir(victim) == ["keep"] and stat.S_IMODE(victim.stat().st_mode) == 0o700
    assert victim.stat().st_uid == 0

    as_owner_of(home, project.unlink)
    as_owner_of(home, demo.write_demo_dataset, home, ms, spec)
    owners = {os.lstat(p).st_uid for p in [project, *project.rglob("*")]}
    assert owners == {account.pw_uid}, "the demo dataset is the user's own"


#: Run in a new PID namespace: a process is held, exits, and its pid is given to a newcomer
#: (``ns_last_pid``), as a busy machine may do during the seconds stop() waits; then the held
#: process is signalled.
RECYCLED_PID = """
import signal, subprocess, sys, time
from casaspawner.local.processes import ProcessHandle

victim = subprocess.Popen(["sleep", "60"])
held = ProcessHandle.open(victim.pid, pidfd=sys.argv[1] == "pidfd")
assert held is not None and held.signal(0) and (held.fd is not None) == (sys.argv[1] == "pidfd")
# Start times count clock ticks (10 ms): the newcomer starts in a later one, as it would.
time.sleep(0.1)
victim.kill()
victim.wait()
with open("/proc/sys/kernel/ns_last_pid", "w") as last:
    last.write(str(victim.pid - 1))
newcomer = subprocess.Popen(["sleep", "60"])
sent = held.signal(signal.SIGTERM)
time.sleep(0.3)
print(newcomer.pid == victim.pid, sent, newcomer.poll() is None)
newcomer.kill()
"""


@pytest.mark.skipif(not ROOT, reason="a PID namespace of its own (unshare) needs root")
@pytest.mark.parametrize("kind", ["pidfd", "start-time"])
def test_stopping_never_signals_a_process_that_got_a_held_pid(kind: str) -> None:
    """stop() lists the session's processes, waits for the server to stop, then signals them: a pid
    freed and reused meanwhile is not signalled (a pidfd, or the start time compared before each
    signal)."""
    assert shutil.which("unshare"), "unshare is not installed (make test installs util-linux)"
    result = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", RECYCLED_PID, kind],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["True", "False", "True"], "the pid's newcomer was signalled"


@pytest.fixture
def tarball_heads() -> Iterator[tuple[str, list[str]]]:
    """An HTTP server on 127.0.0.1 that has no tarballs; yields (base URL, the requests it got)."""
    requests: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:
            requests.append(f"HEAD {self.path}")
            self.send_response(404)
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", requests
    finally:
        server.shutdown()


def test_what_the_hub_probed_is_remembered_across_spawners(
    storage: Path, tarball_heads: tuple[str, list[str]]
) -> None:
    url, requests = tarball_heads
    first, second = spawner(storage, tarball_mirror=url), spawner(storage, tarball_mirror=url)
    assert first.environment_manager() is second.environment_manager()
    assert (
        spawner(storage, tarball_mirror=url, probe_timeout=3).environment_manager()
        is not first.environment_manager()
    )
    for local in (first, second, first):
        with pytest.raises(Exception, match="cannot be installed on this hub"):
            asyncio.run(local.prepare_session({"dataset": "~/2023.1.00026.S"}))
        assert "is unreachable (HTTP 404)" in asyncio.run(local.resolution_preview())
    assert requests == ["HEAD /casa-6.5.4-9-pipeline-2023.1.0.124-py3.8.tar.xz"], requests


def test_the_form_of_a_returning_user_resolves_nothing_and_creates_nothing(
    storage: Path, tarball_heads: tuple[str, list[str]]
) -> None:
    """A page view of the form shows the last resolution from the server's state and what the hub
    already knows about installing it: the dataset is not read again (it is gone here), no tarball
    is probed, and a user without a local account yet (hub as root) does not get one from looking
    at the form."""
    url, requests = tarball_heads
    first = spawner(storage, tarball_mirror=url)
    with pytest.raises(Exception, match="cannot be installed on this hub"):
        asyncio.run(first.prepare_session({"dataset": "~/2023.1.00026.S"}))
    state = first.get_state()
    probed = list(requests)
    shutil.rmtree(storage / "home" / "demo" / "2023.1.00026.S")

    class Newcomer(User):
        name = f"form-{os.urandom(3).hex()}"

    local = LocalCASASpawner(
        user=Newcomer(), storage_root=str(storage), tarball_mirror=url, probe_timeout=2
    )
    local.load_state(state)
    local.user_options = dict(first.user_options)
    form = asyncio.run(local.options_form(local))
    assert (
        "~/2023.1.00026.S: CASA 6.5.4-9 (pipeline 2023.1.0.124), the exact build. The pipeline "
        "manifest names pipeline 2023.1.0.124 with CASA 6.5.4-9;"
    ) in form
    assert "cannot be installed on this hub: its tarball" in form, (
        "what the hub probed before is said"
    )
    assert requests == probed, "the form probed a tarball"
    with pytest.raises(KeyError):
        pwd.getpwnam(local.system_username())
    fresh = spawner(storage, tarball_mirror="http://127.0.0.1:9/", probe_timeout=1)
    fresh.load_state(state)
    fresh.user_options = dict(first.user_options)
    assert "cannot be installed" not in asyncio.run(fresh.resolution_preview()), (
        "not probed: not said"
    )


def test_a_long_download_is_a_bar_on_the_progress_page_at_most_every_two_seconds(
    storage: Path,
) -> None:
    from casaspawner.local.environments.progress import Progress

    local = spawner(storage)
    local._event("Installing casaplotms==2.6.2 (a few minutes, once per release).", 10)

    def part(done: int) -> Progress:
        text = f"Downloading casaplotms: {done} of 270 MB, 30 MB/s, about 6 s left."
        return Progress(text, step="Downloading casaplotms", done=done, total=270)

    for done in (27, 54, 81):
        local._event(part(done))
    # Said at once, then not again within two seconds; the end of a step always.
    assert [e["message"] for e in local._events[1:]] == [str(part(27))]
    local._event(part(270))
    first, last = local._events[1], local._events[2]
    assert first["html_message"] == (
        '<progress max="100" value="10"></progress> Downloading casaplotms: 27 of 270 MB, '
        "30 MB/s, about 6 s left."
    )
    assert last["html_message"].startswith('<progress max="100" value="100"></progress>')
    assert [e["progress"] for e in local._events] == [10, 11, 12]
    # A heartbeat (no size) is a plain line.
    local._event(Progress("Unpacking the casaplotms GUI: 10 s so far.", step="Unpacking"))
    assert "html_message" not in local._events[-1]

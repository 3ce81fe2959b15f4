"""The installed command line, run as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from casaspawner.datasets.synth import write_dataset

CLI = [sys.executable, "-m", "casaspawner"]
RESOLVE_KEYS = {
    "processed_with",
    "release",
    "casa",
    "pipeline",
    "image",
    "exact",
    "evidence",
    "reason",
}


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60, check=False)


def test_catalog_table_and_json() -> None:
    table = run("catalog")
    assert table.returncode == 0
    assert table.stdout.splitlines()[0].split()[:3] == ["ID", "CASA", "PIPELINE"]
    assert any(
        line.startswith("pl-2023.1.0.124 ") and "6.5.4-9" in line
        for line in table.stdout.splitlines()
    )
    rows = json.loads(run("catalog", "--json").stdout)
    assert {row["id"] for row in rows} >= {"pl-r42254", "pl-2025.1.0.36", "casa-4.2.2"}
    internal = next(r for r in rows if r["id"] == "pl-r42030")
    assert (internal["restore_with"], internal["ops_end"], internal["os"]) == (
        "pl-r42254",
        "unknown",
        "el7",
    )
    assert all(
        {"os", "casa_internal", "pipeline_branch", "manual", "sources"} <= set(row) for row in rows
    )


def test_catalog_table_says_what_is_current() -> None:
    lines = run("catalog").stdout.splitlines()
    rows = {line.split()[0]: line for line in lines[1:]}
    assert [release_id for release_id, line in rows.items() if "→ now" in line] == [
        "pl-2025.1.0.37"
    ]
    for superseded in ("pl-r42030", "pl-2020.1.0.36"):
        assert "→ superseded" in rows[superseded]
    assert "planned from 2026-10" in rows["pl-2026.2.0"]
    assert "pipeline (4), manual (4)" in rows["pl-r39732"] and "manual (0)" in rows["casa-3.4.0"]
    assert all(len(line) < 160 for line in lines)


@pytest.mark.parametrize(
    ("era", "casa", "pipeline", "exact"),
    [
        ("cycle10", "6.5.4-9", "2023.1.0.124", True),
        ("cycle5-internal", "5.4.0-70", "r42254", False),
        ("cycle2-manual", "4.2.2", None, True),
    ],
)
def test_resolve_json_has_exactly_the_documented_keys(
    tmp_path: Path, era: str, casa: str, pipeline: str | None, exact: bool
) -> None:
    write_dataset(tmp_path, era)
    result = run("resolve", str(tmp_path), "--json", "--registry", "registry.example.org/casa")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert set(data) == RESOLVE_KEYS
    assert set(data["processed_with"]) == {"casa", "pipeline"} and set(data["evidence"]) == {
        "kind",
        "path",
    }
    assert (data["casa"], data["pipeline"], data["exact"]) == (casa, pipeline, exact)
    assert data["image"].startswith("registry.example.org/casa/casa:" + casa)
    assert isinstance(data["reason"], str) and data["reason"].endswith(".")


def test_resolve_error_json_says_what_kind_of_failure_it_is(tmp_path: Path) -> None:
    """With --error-json a failure is still one sentence on stderr and exit 2; stdout says which
    kind it is, and a dataset that tells no version gives its finding apart (what a hub needs to
    run the user's own choice). Plain --json prints nothing on stdout when it fails."""
    (tmp_path / "member.uid___A001_X1_X2").mkdir()
    result = run("resolve", str(tmp_path / "member.uid___A001_X1_X2"), "--json", "--error-json")
    assert result.returncode == 2
    data = json.loads(result.stdout)
    assert result.stderr == f"casaspawner: {data['error']}\n"
    assert (
        data["kind"] == "VersionUnknown"
        and data["error"] == f"{data['finding']}; {data['advice']}."
    )
    assert data["finding"].startswith(
        f"Nothing in {tmp_path / 'member.uid___A001_X1_X2'} tells which CASA"
    )
    result = run("resolve", str(tmp_path / "nothing"), "--json", "--error-json")
    assert result.returncode == 2 and json.loads(result.stdout)["kind"] == "ResolutionError"
    for plain in (["--json"], []):
        result = run("resolve", str(tmp_path / "nothing"), *plain)
        assert result.returncode == 2 and result.stdout == "", "without --error-json: stderr only"


def test_resolve_text_output(tmp_path: Path) -> None:
    write_dataset(tmp_path, "cycle7")
    out = run("resolve", str(tmp_path)).stdout
    assert "session runs:   CASA 6.1.1-15 (pipeline 2020.1.0.40) [pl-2020.1.0.40]" in out
    # names from the dataset print escaped: a line stays a line, and the terminal gets no escape
    # sequence
    (manifest,) = tmp_path.rglob("*.pipeline_manifest.xml")
    manifest.rename(manifest.with_name("member.\x1b[2J\x1b[31mX\nY.pipeline_manifest.xml"))
    lines = run("resolve", str(tmp_path)).stdout.splitlines()
    assert len(lines) == len(out.splitlines()) and "\x1b" not in "".join(lines)
    assert any(
        line.startswith("evidence:") and "\\x1b[2J" in line and "X\\nY" in line for line in lines
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["resolve", "not-an-id"], "is not an ALMA dataset identifier"),
        (["resolve", "/no/such/dataset"], "does not exist"),
        (
            [
                "resolve",
                "uid://A001/X1/X2",
                "--archive-url",
                "http://127.0.0.1:9",
                "--timeout",
                "2",
            ],
            "could not be reached",
        ),
        (["resolve"], "required: TARGET"),
        (["frobnicate"], "invalid choice"),
        (["catalog", "--catalog", "/no/such/file.yaml"], "cannot be read"),
    ],
)
def test_bad_input_exits_2_with_one_line(args: list[str], message: str) -> None:
    result = run(*args)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]
    assert "Traceback" not in result.stderr


LONG = "a" * 300


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (LONG, "is not an ALMA dataset identifier"),
        ("./" + LONG, "(302 characters) cannot be opened (File name too long)"),
        ("/tmp/" + LONG + "/member.uid___A001_X1_X2", "cannot be opened (File name too long)"),
        ("/".join(["abcdefgh"] * 600), "cannot be opened (File name too long)"),
        ("./a\x00b", "./a\\x00b does not exist"),
    ],
)
def test_unusable_paths_exit_2_with_one_line(target: str, message: str) -> None:
    result = run_in_process("resolve", target) if "\x00" in target else run("resolve", target)
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr
    assert len(lines[0]) < 400


def run_in_process(*args: str) -> subprocess.CompletedProcess[str]:
    """argv cannot carry a NUL; such text reaches the resolver through main() in a fresh
    interpreter."""
    code = f"import sys; from casaspawner.cli import main; sys.exit(main({list(args)!r}))"
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )


def test_a_loop_of_links_and_an_unwritable_output_exit_2(tmp_path: Path) -> None:
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    result = run("resolve", str(loop))
    assert (
        result.returncode == 2
        and "cannot be opened (Too many levels of symbolic links)" in result.stderr
    )
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = run("demo-data", str(blocker / "trees"), "--era", "cycle8")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "Not a directory." in result.stderr and "Traceback" not in result.stderr


def test_no_evidence_exits_2(tmp_path: Path) -> None:
    write_dataset(tmp_path, "no-evidence")
    result = run("resolve", str(tmp_path), "--json")
    # No result, and nothing but the sentence.
    assert result.returncode == 2 and result.stdout == ""
    assert (
        "tells which CASA version" in result.stderr
        and len(result.stderr.strip().splitlines()) == 1
    )


def test_demo_data_writes_resolvable_trees(tmp_path: Path) -> None:
    result = run("demo-data", str(tmp_path), "--era", "cycle8", "--era", "cycle3-pipeline")
    assert result.returncode == 0
    members = [Path(line) for line in result.stdout.splitlines()]
    assert len(members) == 2 and all(
        m.name.startswith("member.uid___") and m.is_dir() for m in members
    )
    assert (
        json.loads(run("resolve", str(tmp_path / "cycle8"), "--json").stdout)["casa"] == "6.2.1-7"
    )


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).with_name("casaspawner")
    result = subprocess.run(
        [str(script), "--version"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0 and result.stdout.startswith("casaspawner ")

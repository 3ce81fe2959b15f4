"""Run one script in modular CASA's Python as ``casa -c`` would.

``python casa_run.py SCRIPT [ARGS...]`` is what ``casaspawner run`` starts in a release's
environment built from wheels. Every task and tool is a global of the script, as at the CASA
prompt and in ALMA's ``scriptForPI.py``; CASA logs to ``$CASASPAWNER_CASA_LOGFILE``; the
script sees ``sys.argv == [SCRIPT, *ARGS]`` and ``__name__ == "__main__"``.

An exception the script raises is printed with its traceback, its last line is written to
``$CASASPAWNER_RUN_ERROR`` (the run's one sentence) and the exit status is 1. Nothing here
imports casaspawner: this file runs in CASA's own Python.
"""

import importlib
import os
import runpy
import sys
import traceback
from typing import Any


def casa_globals() -> dict[str, Any]:
    """Every CASA task and tool by name, and ``casalog`` logging to the run's CASA log."""
    tasks = importlib.import_module("casatasks")
    tools = importlib.import_module("casatools")
    names: dict[str, Any] = {}
    names.update({n: getattr(tools, n) for n in tools.__all__ if hasattr(tools, n)})
    names.update({n: getattr(tasks, n) for n in tasks.__all__ if hasattr(tasks, n)})
    names["casalog"] = tasks.casalog
    logfile = os.environ.get("CASASPAWNER_CASA_LOGFILE")
    if logfile:
        tasks.casalog.setlogfile(logfile)
    # The GUI tasks live in packages of their own, which a build may lack.
    for package, task_names in (("casaplotms", ("plotms",)), ("casaviewer", ("imview", "msview"))):
        try:
            module = importlib.import_module(package)
        except Exception:  # noqa: S112
            # This build has no such GUI.
            continue
        names.update({n: getattr(module, n) for n in task_names if hasattr(module, n)})
    return names


def say_error(text: str) -> None:
    """Leave the run's one sentence where ``casaspawner run`` reads it."""
    target = os.environ.get("CASASPAWNER_RUN_ERROR")
    if target:
        with open(target, "w", encoding="utf-8") as handle:
            handle.write(" ".join(text.split())[:500] + "\n")


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: casa_run.py SCRIPT [ARGS...]", file=sys.stderr)
        return 2
    script = argv[0]
    sys.argv = list(argv)
    # The script's directory comes first on the import path, as for ``python SCRIPT``.
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    try:
        names = casa_globals()
    except Exception as exc:
        traceback.print_exc()
        say_error(f"CASA could not be loaded ({type(exc).__name__}: {exc})")
        return 1
    try:
        runpy.run_path(script, init_globals=names, run_name="__main__")
    except SystemExit as exc:
        if exc.code in (None, 0):
            return 0
        code = exc.code if isinstance(exc.code, int) else 1
        if not isinstance(exc.code, int):
            say_error(f"the script exited: {exc.code}")
        return code
    except BaseException as exc:
        traceback.print_exc()
        say_error(f"the script raised {type(exc).__name__}: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Start-up file of the desktop's CASA terminal.

The terminal runs IPython with this build's casatools and casatasks. Its window is titled
``<build> (starting)`` until casatools and casatasks are imported and the version is printed. Only
then does its title become the build's name, e.g. ``CASA 6.6.5-31``, so a CASA prompt that is
ready can be seen from outside. If they cannot be imported, the title says
``<build>: start-up failed`` and the terminal shows why.
"""

import os
import sys

_title = os.environ.get("CASASPAWNER_KERNEL_NAME") or "CASA"


def _set_title(text: str) -> None:
    # The xterm escape sequence "set window title".
    sys.stdout.write(f"\033]2;{text}\007")
    sys.stdout.flush()


try:
    import casatasks
    import casatools

    # The CASA prompt offers every task, as ``casa`` does.
    from casatasks import *  # noqa: F403

    # Every tool as well. ``casatools.__all__`` names some that do not exist, so no star import.
    globals().update(
        {name: getattr(casatools, name) for name in casatools.__all__ if hasattr(casatools, name)}
    )
except Exception as _error:
    # Whatever it is, the user reads it here.
    _set_title(f"{_title}: start-up failed")
    print(f"CASA could not be loaded: {type(_error).__name__}: {_error}")
else:
    casalog = casatasks.casalog
    _logfile = os.environ.get("CASASPAWNER_CASA_LOGFILE")
    if _logfile:
        casalog.setlogfile(_logfile)

    print(
        f"CASA {casatools.version_string()} "
        "(casatools and casatasks loaded; tasks and tools are ready)"
    )
    if os.environ.get("CASASPAWNER_DATASET"):
        print(f"Dataset: {os.environ['CASASPAWNER_DATASET']}")
    if os.environ.get("CASASPAWNER_REASON"):
        print(f"Why this build: {os.environ['CASASPAWNER_REASON']}")
    if os.environ.get("CASASPAWNER_APPROXIMATE") == "true":
        print(
            "APPROXIMATE SESSION: "
            "this is not the CASA build that processed the dataset (why: above)."
        )
    # The GUI tasks live in their own packages in modular CASA.
    # A monolithic CASA may lack some of them.
    _gui_tasks = []
    for _package, _names in (("casaplotms", ("plotms",)), ("casaviewer", ("imview", "msview"))):
        try:
            _module = __import__(_package)
        except Exception:  # noqa: S112
            # This build has no such GUI.
            continue
        for _name in _names:
            if callable(getattr(_module, _name, None)):
                globals()[_name] = getattr(_module, _name)
                _gui_tasks.append(f"{_name}()")
    print(
        "GUIs: the tools window, the desktop's right-click menu"
        + (f", or {', '.join(_gui_tasks)} here." if _gui_tasks else ".")
    )
    _set_title(_title)

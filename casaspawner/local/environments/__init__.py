"""Per-release CASA environments for sessions on one machine.

An environment is a venv of wheels or an unpacked tarball.

- ``model`` is what a finished environment offers a session.
- ``manager`` finds and builds environments.
- ``steps`` are the build's commands and checks.
- ``session_files`` installs the desktop and package copies sessions read.
- ``pythons`` finds interpreters.
- ``cli`` is ``casaspawner envs``.
"""

from casaspawner.local.environments.manager import EnvironmentManager
from casaspawner.local.environments.model import CasaEnvironment
from casaspawner.local.environments.steps import EnvironmentBuildError

__all__ = ["CasaEnvironment", "EnvironmentBuildError", "EnvironmentManager"]

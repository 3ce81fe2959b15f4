"""What the tests share, one module a topic; imported as ``support.<topic>`` (the ``tests``
directory is on ``sys.path``: tests/conftest.py puts it there, benchmarks insert it themselves).

- ``alma``: stand-ins of the ALMA archive's TAP and DataLink services, real VOTables.
- ``browser``: Debian's Chromium through Playwright, and the OIDC login in it.
- ``datasets``: the synthetic storage tree (Cavern) and the paths users type for its datasets.
- ``hub``: a JupyterHub process on 127.0.0.1, started from a config file (tests and benchmarks).
- ``images``: the ``images`` tier's build command and names.
- ``kube``: a kmock Kubernetes emulator, a fake kubelet and a stand-in session server.
- ``local``: the local sessions' X server, its windows and their titles.
- ``pss``: an independent checker of the Pod Security Standards.
- ``session``: a plain backend for the session pipeline.
- ``spawners``: the mixin on JupyterHub's own spawners, and a refusal's one sentence.
- ``users``: a stand-in for JupyterHub's ``User`` and the login data it carries.
- ``vospace``: a VOSpace-like service over a storage tree.
- ``z2jh``: the Zero to JupyterHub chart's hub configuration, replayed offline.
"""

from __future__ import annotations

from pathlib import Path

#: The checkout the tests run from.
REPO = Path(__file__).resolve().parents[2]
#: Where ``make chp`` installs configurable-http-proxy (and every hub the tests start finds it).
NPM_BIN = REPO / ".cache" / "npm" / "node_modules" / ".bin"
#: configurable-http-proxy, as ``make chp`` installs it.
CHP = NPM_BIN / "configurable-http-proxy"
#: The screenshots the docs show; tests write them when asked to (``CASASPAWNER_SCREENSHOTS``).
SCREENSHOTS = REPO / "docs" / "_static" / "screenshots"

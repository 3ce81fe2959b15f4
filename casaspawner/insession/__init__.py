"""What runs inside a session, in the session image or a local environment.

``desktop/`` is the noVNC desktop (xstartup, the CASA menu and launchers); ``notices`` is the
Jupyter server extension that shows the operators' notices; ``notices-lab`` and ``labextension``
are the JupyterLab extension's source and build; ``lab-overrides`` and ``jupyter-config`` are the
settings a wheel installs. Nothing here imports the hub side of casaspawner.
"""

"""Running sessions as processes on one machine: ``LocalCASASpawner``, the embedded default.

- ``spawner`` is the hub glue.
- ``environments`` builds each release's CASA environment.
- ``accounts`` manages local users and groups on a hub running as root.
- ``processes`` tracks and stops a session's processes.
- ``demo`` is ``make demo``.
"""

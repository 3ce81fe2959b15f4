"""What the two JupyterHub spawners share: traits, hooks and how errors show.

``CASASpawner`` in :mod:`casaspawner.kube` runs sessions on Kubernetes. ``LocalCASASpawner`` in
:mod:`casaspawner.local` runs them on one machine.
"""

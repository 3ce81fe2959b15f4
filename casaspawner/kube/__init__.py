"""Running sessions on Kubernetes: ``CASASpawner``, a KubeSpawner subclass.

``spawner`` is the hub glue; ``objects`` builds the pod's fields from a plan, purely;
``podsecurity`` checks a pod against the Pod Security Standards; ``events`` turns kubelet events
into progress lines and failures; ``reflector`` wakes a start when its pod changes; ``dryrun`` is
``casaspawner pod``. ``jobs`` builds a headless run's Job, purely, and ``runs`` is
``casaspawner run --kubernetes``.
"""

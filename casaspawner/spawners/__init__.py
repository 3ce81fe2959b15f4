"""JupyterHub spawners: CASASpawner (Kubernetes) and LocalCASASpawner (one machine)."""

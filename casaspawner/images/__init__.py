"""The casaspawner image set: a session base, the session image and one CASA image per catalog release.

``matrix`` (pure) maps releases to recipes, build arguments and the tags the spawner uses; ``engine`` drives
buildah/podman (or docker) and mmdebstrap; ``smoke`` runs built images the way a pod does; ``cli`` is the
``casaspawner images`` command. The recipes themselves are the checkout's ``images/`` (installed with the
wheel as ``<prefix>/share/casaspawner/images``; see ``engine.recipes_dir``).
"""

from casaspawner.images.matrix import ImageBuildError, MatrixOptions, Recipe, build_matrix, prepuller_values

__all__ = ["ImageBuildError", "MatrixOptions", "Recipe", "build_matrix", "prepuller_values", "register"]


def register(subparsers: object) -> None:
    """Add the ``images`` subcommand (see ``casaspawner.images.cli``)."""
    from casaspawner.images.cli import register as _register

    _register(subparsers)  # type: ignore[arg-type]

"""The casaspawner image set: session base, session image and CASA images.

There is one CASA image per catalog release.

- ``matrix`` is pure. It maps releases to recipes, build arguments and the tags the spawner uses.
- ``engine`` drives buildah and podman (or docker instead) and mmdebstrap.
- ``smoke`` runs built images the way a pod does.
- ``cli`` is the ``casaspawner images`` command.

The recipes themselves are the checkout's ``images/``. The wheel installs them as
``<prefix>/share/casaspawner/images``. See ``engine.recipes_dir``.
"""

from casaspawner.images.matrix import (
    ImageBuildError,
    MatrixOptions,
    Recipe,
    build_matrix,
    prepuller_values,
)

__all__ = [
    "ImageBuildError",
    "MatrixOptions",
    "Recipe",
    "build_matrix",
    "prepuller_values",
    "register",
]


def register(subparsers: object) -> None:
    """Add the ``images`` subcommand, defined in ``casaspawner.images.cli``."""
    from casaspawner.images.cli import register as _register

    _register(subparsers)  # type: ignore[arg-type]

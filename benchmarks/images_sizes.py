"""Image sizes of the session image and CASA images (``make bench-images`` →
benchmarks/results/images.json).

Sizes are uncompressed, as stored locally (``podman image inspect``). Layer sizes are differences:
the session layer is the session image minus the base it was built on (the ``io.casaspawner.base``
label of the session base), a CASA layer is the CASA image minus the session image (CASA images and
the session image share the session base and the casaspawner layer). Goals (issue 5): session layer
+ base ≤ 1.5 GB, each modular CASA layer ≤ 1 GB.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
from pathlib import Path

from casaspawner.catalog import load_catalog
from casaspawner.images import engine
from casaspawner.images.matrix import MatrixOptions, build_matrix

RESULTS = Path(__file__).resolve().parent / "results" / "images.json"
GB = 1e9
GOALS = {"session": 1.5 * GB, "modular": 1.0 * GB}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--registry", default="localhost/casaspawner")
    parser.add_argument("releases", nargs="*", default=["casa-6.6.5-31"])
    args = parser.parse_args()
    tools = engine.detect_tools()
    recipes = build_matrix(load_catalog(), MatrixOptions(registry=args.registry), args.releases)
    session_base, session = recipes[:2]
    base = tools.image_labels(session_base.image).get("io.casaspawner.base", "")
    if not tools.image_id(base):
        raise SystemExit(
            f"the base {base!r} that {session_base.image} was built on is not in local storage"
        )
    base_size = tools.image_size(base)
    session_size = tools.image_size(session.image)
    rows = [
        {
            "image": session.image,
            "kind": "session",
            "size_bytes": session_size,
            "layer_bytes": session_size - base_size,
            "base": base,
            "base_bytes": base_size,
            "goal_bytes": GOALS["session"],
            "meets_goal": session_size <= GOALS["session"],
        }
    ]
    for recipe in recipes[2:]:
        size = tools.image_size(recipe.image)
        goal = GOALS.get(recipe.kind)
        rows.append(
            {
                "image": recipe.image,
                "kind": recipe.kind,
                "size_bytes": size,
                "layer_bytes": size - session_size,
                "goal_bytes": goal,
                "meets_goal": None if goal is None else size - session_size <= goal,
            }
        )
    result = {
        "benchmark": "image sizes (uncompressed, local storage)",
        "when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "images": rows,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    for row in rows:
        print(
            f"{row['image']}: {row['size_bytes'] / GB:.2f} GB (layer "
            f"{row['layer_bytes'] / GB:.2f} GB)"
        )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()

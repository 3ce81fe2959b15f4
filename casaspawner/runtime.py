"""What images, local environments and sessions agree on at run time.

The image build tool (``casaspawner.images``) and the local environments (``casaspawner.local``)
install CASA differently, but a session must look the same in both: the same extra packages, the
same kernel directory, the same site configuration. This module holds those shared facts, and the
cache directory every part of casaspawner on one machine uses.
"""

from __future__ import annotations

import base64
import json
import os
import re
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: Packages added to every CASA environment built from wheels.
#:
#: The kernel, what casatasks imports without declaring it, the logger GUI, and a protobuf that
#: the GUI tasks' generated code still loads: casaplotms and casaviewer ``*_pb2.py`` predate
#: protobuf 3.21, and with a newer one ``import casaplotms`` fails.
EXTRA_PACKAGES: tuple[str, ...] = ("ipykernel", "six", "casalogger", "protobuf<3.21")


def kernel_id(tag: str) -> str:
    """Return the directory name of a release's kernelspec, from its image tag.

    For example ``casa-6.6.5-31``.
    """
    return "casa-" + re.sub(r"[^a-z0-9._-]", "-", tag.lower())


def site_config_text(measures: Path | str) -> str:
    """A ``casasiteconfig.py`` reading measures from one shared, read-only tree."""
    return (
        "# Written by casaspawner: CASA reads measures from one shared, read-only tree.\n"
        f"measurespath = {str(measures)!r}\n"
        f"datapath = [{str(measures)!r}]\n"
        "measures_auto_update = False\n"
        "data_auto_update = False\n"
    )


def cache_dir() -> Path:
    """Where casaspawner caches files on this machine.

    ``$XDG_CACHE_HOME/casaspawner`` (``~/.cache/casaspawner``), or ``/var/cache/casaspawner`` for
    root: root's home is private, and sessions run as other users who must read the cache.
    """
    if os.geteuid() == 0:
        return Path("/var/cache/casaspawner")
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "casaspawner"


#: The variable carrying a session's reproducibility record, as the hub wrote it, to the session.
RECORD_ENV = "CASASPAWNER_RECORD"
#: The variable naming the directory the session writes its record into.
RECORD_DIR_ENV = "CASASPAWNER_RECORD_DIR"
#: The record's file in its directory: an RO-Crate's metadata file.
RECORD_FILE = "ro-crate-metadata.json"
#: The record's entities that the session completes, by ``@id``.
RECORD_ACTION_ID = "#session"
RECORD_EVIDENCE_ID = "#evidence"
RECORD_MEASURES_ID = "#measures"
RECORD_RUNTIME_ID = "#runtime"
#: Where a Kubernetes run's pod asks the hub for its image's digest, and the run's key to ask
#: with (the hub gives the digest only to the pod whose spec holds that key).
RUN_IMAGE_URL_ENV = "CASASPAWNER_RUN_IMAGE_URL"
RUN_IMAGE_KEY_ENV = "CASASPAWNER_RUN_IMAGE_KEY"
#: The hub's API path (under ``/hub/api``) of runs: ``<user>/<run id>/image`` gives the digest.
RUNS_API = "casa-runs"
#: The request header carrying that key.
RUN_IMAGE_KEY_HEADER = "X-Casaspawner-Run-Key"


#: The most a record's variable unpacks to, in bytes (a record is a few KiB).
RECORD_LIMIT = 1 << 22


def record_text(record: Mapping[str, Any]) -> str:
    """The record as the session's variable carries it: compressed JSON in base64.

    Base64, because KubeSpawner expands ``{…}`` templates in variables, and JSON has braces.
    Compressed, because the pod carries it in every watch event and in etcd: a session's 4 KiB
    record takes 1.7 KiB of the variable instead of 5.5.
    """
    text = json.dumps(record, separators=(",", ":"), ensure_ascii=False)
    return base64.b64encode(zlib.compress(text.encode())).decode("ascii")


def record_from_text(text: str) -> Any:
    """The record a session's variable carries: compressed, or plain JSON as earlier hubs wrote.

    Raises ValueError for text that is neither, or that unpacks to more than ``RECORD_LIMIT``.
    """
    packed = base64.b64decode(text, validate=True)
    if packed[:1] == b"{":
        return json.loads(packed)
    unpacker = zlib.decompressobj()
    try:
        data = unpacker.decompress(packed, RECORD_LIMIT)
    except zlib.error as exc:
        raise ValueError(f"the record is not compressed JSON: {exc}") from None
    if unpacker.unconsumed_tail or not unpacker.eof:
        raise ValueError("the record is cut short or larger than the limit")
    return json.loads(data)

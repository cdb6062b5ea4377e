"""Reading a manifest file in tests the way cloudbackup does: parsed against its own path."""

from __future__ import annotations

from pathlib import Path

from cloudbackup.core.model import Manifest, manifest_ref
from cloudbackup.sources.registry import parse_manifest


def load_manifest(path: Path) -> Manifest:
    """``<local>/<host>/<source>/<id>.manifest.json``, parsed against that key."""
    ref = manifest_ref("/".join(path.parts[-3:]))
    assert ref is not None, path
    return parse_manifest(path.read_bytes(), ref)

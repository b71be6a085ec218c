"""Where files live: a local folder or any pyarrow filesystem URI, behind one helper."""

from __future__ import annotations

import os

import pyarrow.fs as pafs

from orchestrator.common.errors import UserError


def filesystem(uri: str, what: str, error: type[UserError] = UserError) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a folder or a pyarrow URI, query options included
    (s3://bucket/pool?endpoint_override=host:port&scheme=http). Local paths come back
    absolute: trials run in folders of their own. hf://datasets/... reads Hugging Face
    datasets through huggingface_hub (when the machine is online). `what` names the flag or
    key in errors."""
    if uri.startswith("hf://"):
        from huggingface_hub import HfFileSystem

        return pafs.PyFileSystem(pafs.FSSpecHandler(HfFileSystem())), uri[len("hf://"):]
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))
    try:
        return pafs.FileSystem.from_uri(uri)
    except (ValueError, OSError) as e:  # ArrowInvalid is a ValueError
        raise error(f"{what} {uri}: cannot open: {e}") from None

"""Model files from the local disk only: a path, or a name already in the local HF cache."""

import os


def resolve_local(path_or_name, what):
    """A local file or directory for ``path_or_name``: the path itself if it exists, else (for a
    bare model name) its snapshot in the local Hugging Face cache.  Never downloads; anything
    else raises ``FileNotFoundError`` naming ``what`` and the value."""
    path = os.path.expanduser(os.fspath(path_or_name))
    if os.path.exists(path):
        return path
    if os.sep in path or path.startswith("."):
        raise FileNotFoundError(f"{what}: the configured path {path_or_name!r} does not exist")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(path, local_files_only=True)
    except Exception as exc:  # LocalEntryNotFoundError and friends: the name is not cached
        raise FileNotFoundError(
            f"{what}: {path_or_name!r} is neither a local path nor in the local Hugging Face cache, and "
            "unit_fast never downloads; point the config at a local copy"
        ) from exc

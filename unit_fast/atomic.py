"""``atomic_write``: the one way unit_fast writes a file (checkpoints, logs rewritten on resume,
metrics JSON, exported weights).

A reader sees the old file or the new one, never half of one, and a power cut right after
``atomic_write`` returns keeps the new one: the data goes to a temporary file in the same folder,
is flushed and ``fsync``ed, renamed over the target (atomic on POSIX), and then the folder itself
is ``fsync``ed so that the rename is on disk too (without it, the rename can be lost while the
old name's directory entry survives).

Two kinds of output are not single files and are made safe otherwise: ``log.jsonl`` is appended
one record per line (a reader drops a torn last line; a resume rewrites it with
``atomic_write``), and the synthetic dataset is generated into a temporary folder that is renamed
into place at once (``training/data.py``).  TensorBoard's event files are TensorBoard's own.
"""

import os

TEMP_MARK = ".tmp-"  # temporaries are ``<name>.tmp-<pid>``: what a killed run leaves behind


def fsync_folder(folder):
    """Make a rename or a new entry in ``folder`` durable (no-op where folders can't be opened)."""
    try:
        fd = os.open(folder or ".", os.O_RDONLY)
    except OSError:  # e.g. Windows: folders cannot be opened; the rename is all there is
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems (network mounts) refuse fsync on folders
    finally:
        os.close(fd)


def image_format(path, option):
    """Pillow's format name for ``path``'s extension (``atomic_write`` hands Pillow a file object,
    which carries no extension); ValueError naming ``option`` when Pillow knows none."""
    from PIL import Image

    ext = os.path.splitext(os.fspath(path))[1].lower()
    fmt = Image.registered_extensions().get(ext)
    if fmt is None:
        raise ValueError(f"{option}: {os.fspath(path)!r} has no image extension Pillow can write "
                         "(e.g. .png, .jpg)")
    return fmt


def atomic_write(path, write, *, binary=True):
    """Write ``path`` atomically.

    Args:
        path: the target file; its folder must exist.
        write: ``bytes`` / ``str`` to write, or a callable ``write(f)`` given the open temporary
            file (e.g. ``lambda f: torch.save(obj, f)``).
        binary: open the temporary file in binary mode (``str`` data needs ``binary=False``).

    Returns:
        ``path``.  On any error the temporary file is removed and the target is left as it was.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = f"{path}{TEMP_MARK}{os.getpid()}"
    try:
        with open(tmp, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            if callable(write):
                write(f)
            else:
                f.write(write)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_folder(folder)
    return path

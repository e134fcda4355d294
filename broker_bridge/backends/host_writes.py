"""The host writing into a directory that sandbox code controls."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path


def write_beneath(root: Path, relative_path: str, data: bytes | bytearray) -> None:
    """Write ``root/relative_path`` without following a symlink anywhere below ``root``.

    Sandbox code owns the directory: a symlink it planted (``inputs`` -> a host directory) must not
    make the host write outside the sandbox. Written under a random name and renamed, so sandbox code
    never sees half a file.
    """
    parts = Path(relative_path).parts
    if not parts or Path(relative_path).is_absolute() or ".." in parts:
        raise ValueError(f"not a path inside the sandbox: {relative_path!r}")
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
    directory = os.open(root, flags)
    try:
        for part in parts[:-1]:
            try:
                inner = os.open(part, flags, dir_fd=directory)
            except FileNotFoundError:
                os.mkdir(part, dir_fd=directory)
                inner = os.open(part, flags, dir_fd=directory)
            os.close(directory)
            directory = inner
        partial = f".{parts[-1]}.{uuid.uuid4().hex}.part"
        handle = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644, dir_fd=directory)
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        os.replace(partial, parts[-1], src_dir_fd=directory, dst_dir_fd=directory)
    finally:
        os.close(directory)


def remove_tree(path: Path) -> None:
    """Remove a sandbox's directory after its processes are dead, even where sandbox code took the
    permissions off its own directories (a non-root worker could not list them otherwise)."""
    shutil.rmtree(path, ignore_errors=True)
    if not os.path.lexists(path):
        return
    for dirpath, dirnames, _ in os.walk(path):  # does not follow symlinks
        for name in dirnames:
            child = os.path.join(dirpath, name)
            if not os.path.islink(child):
                try:
                    os.chmod(child, 0o700)
                except OSError:
                    pass
    shutil.rmtree(path, ignore_errors=True)

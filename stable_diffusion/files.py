"""Outputs that appear whole or not at all: each file or folder is written under a temporary name in
its target's folder and renamed into place, so an interruption, a full disk or a failed write leaves
neither a partial output nor a damaged earlier one."""
import contextlib
import os
import secrets
import shutil
from pathlib import Path


def temporary_name(path):
    """A new hidden name next to `path`: `.NAME.RANDOM.partial`."""
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}.partial")


def remove(path):
    """Removes a file or folder, if there is one."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def staged(path, *, overwrite=False):
    """Yields a temporary path next to `path` to write a file or a folder to; when the block ends it
    is renamed to `path`, or removed if the block raised. FileExistsError if `path` exists (checked
    before and after the block) and not `overwrite`."""
    path = Path(path)

    def refuse_existing():
        if not overwrite and (path.exists() or path.is_symlink()):
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it.")

    refuse_existing()
    temporary = temporary_name(path)
    try:
        yield temporary
        refuse_existing()  # it may have appeared meanwhile
        if path.is_dir() and not path.is_symlink():  # a folder replaces a folder: the old one moved away first
            old = temporary_name(path)
            path.rename(old)
            temporary.rename(path)
            remove(old)
        else:
            os.replace(temporary, path)
    finally:
        remove(temporary)


def check_writable(path):
    """Raises OSError (naming `path`) unless a file can be written there later: `path` is no folder
    and its folder takes a new file (tried with an empty temporary one)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder")
    probe = temporary_name(path)
    try:
        probe.touch(exist_ok=False)
    except OSError as error:
        raise type(error)(f"cannot write in the folder of {path}: {error.strerror or error}") from None
    probe.unlink()

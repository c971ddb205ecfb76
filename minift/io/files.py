"""Writing files so that a crash never leaves half of one, and reading JSON so that errors name the file.

Lesson
------
Checkpoints, adapters and configs are overwritten in place: a run saves every N steps into the same
directory, `minift quantize` rewrites model.safetensors. Writing straight into the final name has a window
in which the file is half written; a crash, a full disk or Ctrl-C in that window destroys the previous good
copy too. So every writer here goes through one pattern:

    write   path.tmp            (the old `path`, if any, is untouched while this runs)
    rename  path.tmp -> path    os.replace: atomic on POSIX and Windows within one file system

A reader then sees either the old file or the new one, never a mixture. If the write fails, the temporary
file is removed and `path` still holds the old version. (The rename is atomic, not durable: after a power
cut the file system may come back with either version. That is the same guarantee torch.save and
transformers give, and it is the one exact resume needs: a complete old checkpoint or a complete new one.)
Every file gets the mode a plain open() gives (0666 minus the umask), so exports are readable by others.
Before a run starts, `check_output_dir` makes sure its folder can be written at all, and a write that
fails later (a full disk) becomes a `WriteError`: one line naming the path and what is still safe.

Reading goes through `read_json_file`: a missing file, bytes that are not UTF-8, broken JSON or JSON that is
not an object all raise an error that starts with the file's path, and `missing` says what the file is for
("a Hugging Face model directory needs config.json"), so the message names the fix.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file


class WriteError(OSError, ValueError):
    """A file or folder could not be written (disk full, no permission): one line naming it and what is safe.

    An OSError (it is one), and a ValueError so the CLI prints it as `minift: error: ...` like any bad input.
    """


def file_mode() -> int:
    """0666 minus the process umask: the mode open() gives a new file (0644 under the usual umask 022)."""
    umask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(umask)
    return 0o666 & ~umask


def replace_atomically(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call write(temporary path), then rename it over `path`; on failure remove the temporary file.

    The file gets the mode a plain open() would give (file_mode): some writers (safetensors) create theirs
    through a private temporary file of mode 0600, which would make exports unreadable to other users.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_safetensors_atomic(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict | None = None) -> Path:
    """Named tensors to a .safetensors file (no pickle), atomically. An I/O failure inside safetensors (which
    reports it as SafetensorError "... (os error 28) ...") is raised as the OSError it is, naming `path`."""

    def write(tmp: Path) -> None:
        try:
            save_file(tensors, str(tmp), metadata=metadata)
        except Exception as error:
            found = re.search(r"\(os error (\d+)\)", str(error))
            if found is None or isinstance(error, OSError):
                raise
            code = int(found.group(1))
            raise OSError(code, os.strerror(code), str(path)) from error

    return replace_atomically(path, write)


def check_output_dir(path: str | Path, what: str = "train.output_dir") -> Path:
    """Fail before any work if a run could not write into `path`: it is a file, it lies under a file, or the
    nearest existing folder (where the missing ones would be created) does not accept a new file.

    The probe is a temporary file (on Linux an anonymous one: no name appears; elsewhere removed at once), so
    nothing is left behind; it catches read-only file systems and places such as /proc that os.access calls
    writable for root.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path}: {what} is an existing file, not a folder; choose a folder name")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{path}: {what} cannot be created, {existing} is a file")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        place = "it" if existing == path else f"{existing}, where it would be created,"
        raise ValueError(f"{path}: {what} is not writable ({place} refuses new files: "
                         f"{error.strerror or error}); choose a folder you can write to") from None
    return path


def write_json_atomic(obj, path: str | Path) -> Path:
    """A JSON document (indented, UTF-8), atomically."""
    return write_text_atomic(json.dumps(obj, indent=2), path)


def write_text_atomic(text: str, path: str | Path) -> Path:
    """A UTF-8 text file, atomically."""
    return replace_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def read_json_file(path: str | Path, missing: str | None = None) -> dict:
    """A JSON object from `path`; every failure names the file. `missing` explains what a missing file means."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing" + (f"; {missing}" if missing else ""))
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: invalid JSON ({error})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data

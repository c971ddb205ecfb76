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

Reading goes through `read_json_file`: a missing file, bytes that are not UTF-8, broken JSON or JSON that is
not an object all raise an error that starts with the file's path, and `missing` says what the file is for
("a Hugging Face model directory needs config.json"), so the message names the fix.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file


def replace_atomically(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call write(temporary path), then rename it over `path`; on failure remove the temporary file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_safetensors_atomic(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict | None = None) -> Path:
    """Named tensors to a .safetensors file (no pickle), atomically."""
    return replace_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


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

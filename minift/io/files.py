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

Every .safetensors file minift reads (model files and shards, adapters, checkpoints, 4-bit directories, head
and index files) goes through `read_safetensors`: a truncated or corrupt file is one error naming the file,
and `floating=True` refuses integer tensors where weights belong. Names read from inside a file (a shard in an
index, the checkpoint latest.json points to) go through `path_inside`, so they cannot leave their folder.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath, PureWindowsPath

import torch
from safetensors import safe_open
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
    except RecursionError:
        raise ValueError(f"{path}: invalid JSON (nested too deeply)") from None
    except OSError as error:  # no permission to read it, an I/O error
        raise ValueError(f"{path}: cannot read it ({error.strerror or error})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def read_safetensors(path: str | Path, floating: bool = False, missing: str | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of a .safetensors file. A missing, truncated or corrupt file is an error naming it;
    floating=True also requires every tensor to be floating point (weights, adapters, optimizer moments)."""
    return read_safetensors_with_metadata(path, floating, missing)[0]


def read_safetensors_with_metadata(path: str | Path, floating: bool = False,
                                   missing: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, the header's string metadata) of a .safetensors file, with read_safetensors' checks."""
    path = Path(path)
    if not path.is_file():
        if path.exists():
            raise ValueError(f"{path}: is a folder, not a .safetensors file")
        raise FileNotFoundError(f"{path}: missing" + (f"; {missing}" if missing else ""))
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except OSError as error:  # no permission to read it, an I/O error
        raise ValueError(f"{path}: cannot read it ({error.strerror or error})") from None
    except Exception as error:  # SafetensorError (bad header, short data), a dtype torch cannot hold
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(f"{path}: not a readable safetensors file ({reason}); it is truncated or corrupt, "
                         "so write it again or download it again") from None
    if floating:
        check_floating(tensors, path)
    return tensors, metadata


def check_floating(tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    """Weights are floating point: an integer or boolean tensor in their place is an error naming it and the file."""
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise ValueError(f"{path}: tensor {name!r} has dtype {str(tensor.dtype).removeprefix('torch.')}, but a "
                             "weight must be floating point (float32, float16 or bfloat16)")


def path_inside(directory: str | Path, name, where: str) -> Path:
    """directory / name for a relative file name read from a file (`where` names it, and the field); an absolute
    name, a "..", a drive or a NUL byte is an error, so a file can only point at things in its own folder.
    The check is on the name, not the resolved path: symlinks inside the folder (Hugging Face's cache) are fine."""
    if not isinstance(name, str) or not name.strip() or "\0" in name:
        raise ValueError(f"{where} is {name!r}; expected a file name inside {directory}")
    pure = PurePosixPath(name.replace("\\", "/"))
    if pure.is_absolute() or PureWindowsPath(name).drive or ".." in pure.parts:
        raise ValueError(f"{where} is {name!r}, which points outside {directory}; only names inside that folder "
                         "are allowed")
    return Path(directory) / pure


# Checks for values read from JSON files (config.json, adapter_config.json, task.json, latest.json): each kind is
# (test, words for the message). bool is a subclass of int in Python, so every number test leaves it out.
def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and v not in (float("inf"), float("-inf"))


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


JSON_KINDS = {
    "positive int": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "int >= 0": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "positive number": (lambda v: _is_number(v) and v > 0, "a positive number"),
    "number": (_is_number, "a finite number"),
    "probability": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "str list": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of strings"),
    "str or str list": (lambda v: isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v)),
                        "a string or a list of strings"),
    "object": (lambda v: isinstance(v, dict), "a JSON object"),
    "list": (lambda v: isinstance(v, list), "a JSON list"),
    # Token ids: some old configs write pad_token_id = -1 for "none", and Llama 3 lists several eos ids.
    "token id": (lambda v: _is_int(v) or (isinstance(v, list) and v != [] and all(_is_int(x) for x in v)),
                 "a token id (an integer, or a list of them)"),
}
REQUIRED = object()


def json_field(data: dict, key: str, where: str | Path, kind: str, default=REQUIRED, section: str = ""):
    """data[key], checked to be of `kind` (a JSON_KINDS key). A missing key, or null, gives `default`; without a
    default it is an error. Errors read "<file>: <section.key> must be <kind>, got <value>"."""
    label = f"{section}.{key}" if section else key
    value = data.get(key)
    if value is None:
        if default is REQUIRED:
            raise ValueError(f"{where}: missing key {label!r}" if key not in data else f"{where}: {label} is null")
        return default
    test, words = JSON_KINDS[kind]
    if not test(value):
        shown = repr(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise ValueError(f"{where}: {label} must be {words}, got {shown} ({type(value).__name__})")
    return value

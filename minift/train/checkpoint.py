"""Training checkpoints: everything a run needs to go on exactly where it stopped — atomic, and no pickle.

Lesson
------
A resumed run must continue *as if it had never stopped*: same batches, same dropout masks, same learning
rate, same optimizer moments. So a checkpoint holds more than weights:

    run_dir/checkpoints/
      step-000040/
        weights.safetensors     the trainable tensors only (for LoRA: only the adapter tensors)
        optimizer.safetensors   AdamW state per parameter, named "<parameter>/exp_avg", "<parameter>/step", ...
        rng.safetensors         random generator states as uint8 tensors (torch CPU, CUDA, extra generators)
        state.json              step, data position, schedule, early stopping, grad scaler, optimizer groups,
                                Python's and numpy's random states — every scalar, as readable JSON
      latest.json               {"directory": "step-000040", "step": 40}

Tensors go into safetensors and everything else into JSON: a checkpoint never runs code when it is read,
unlike a pickled `torch.save` file. Optimizer state is keyed by parameter *name*, not by position, so a
mismatch between a checkpoint and the model names the tensor instead of silently pairing the wrong moments.

Atomic writing, so a crash (or a full disk) never destroys the last good checkpoint:

    1. write every file into  step-000040.tmp/     (each file: temporary name, then rename)
    2. rename the folder to   step-000040/         (one atomic rename: the checkpoint appears whole)
    3. rewrite latest.json    (temporary file, then rename)
    4. delete checkpoints beyond `keep`

If step 1 fails halfway, latest.json still names the previous checkpoint, which is untouched. A failed
write (a full disk) removes the half-written folder and raises one line that names the checkpoint and the
previous one to resume from; a `.tmp` folder left by a killed process is removed when the run next starts
(clean_interrupted_writes).
"""

from __future__ import annotations

import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from minift.io.files import (WriteError, json_field, path_inside, read_json_file, read_safetensors,
                             write_json_atomic, write_safetensors_atomic)

CHECKPOINTS = "checkpoints"
LATEST = "latest.json"


@dataclass
class Checkpoint:
    """One checkpoint as read from disk."""

    path: Path
    step: int
    weights: dict[str, torch.Tensor]
    optimizer_tensors: dict[str, torch.Tensor]
    rng_tensors: dict[str, torch.Tensor]
    state: dict  # the contents of state.json


# ----------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------


def save_checkpoint(run_dir: str | Path, step: int, weights: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                    parameter_names: dict[torch.nn.Parameter, str], state: dict,
                    generators: dict[str, torch.Generator] | None = None, keep: int = 2) -> Path:
    """Write checkpoint `step` of a run; returns its folder. `state` holds the loop's scalars (JSON-able)."""
    root = Path(run_dir) / CHECKPOINTS
    name = f"step-{step:06d}"
    final, tmp = root / name, root / (name + ".tmp")
    optimizer_tensors, optimizer_meta = optimizer_state_to_tensors(optimizer, parameter_names)
    rng_tensors, rng_meta = capture_rng(generators or {})
    plain = {n: t.detach().to("cpu").contiguous() for n, t in weights.items()}
    try:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # left over from an interrupted write
        tmp.mkdir()
        write_safetensors_atomic(plain, tmp / "weights.safetensors", metadata={"step": str(step)})
        write_safetensors_atomic(optimizer_tensors, tmp / "optimizer.safetensors")
        write_safetensors_atomic(rng_tensors, tmp / "rng.safetensors")
        write_json_atomic({**state, "step": step, "optimizer": optimizer_meta, "rng": rng_meta}, tmp / "state.json")
    except OSError as error:  # a full disk, a folder turned read-only: the half-written copy goes, the last stays
        shutil.rmtree(tmp, ignore_errors=True)
        raise WriteError(f"{final}: could not write the checkpoint ({error.strerror or error}); "
                         f"{previous_checkpoint_note(run_dir, final)}") from error

    if final.exists():  # the same step written again (e.g. the end of a resumed run): replace it
        shutil.rmtree(final)
    tmp.rename(final)
    write_json_atomic({"directory": name, "step": step}, root / LATEST)
    prune_checkpoints(root, keep)
    return final


def previous_checkpoint_note(run_dir: str | Path, failed: Path | None = None) -> str:
    """What is still safe after a failed write: the last complete checkpoint, said in one clause."""
    try:
        previous = latest_checkpoint(run_dir)
    except ValueError:  # an unreadable latest.json: say nothing we cannot vouch for
        previous = None
    if previous is None or previous == failed:
        return "there is no earlier checkpoint to resume from; free some space and start again"
    return f"the previous checkpoint {previous} is intact; free some space and resume with --resume {run_dir}"


def clean_interrupted_writes(run_dir: str | Path) -> list[Path]:
    """Delete what an interrupted write left in a run folder, and return it: `*.tmp` checkpoint folders and
    temporary files (checkpoints/, the run folder itself, the final/ export). A complete checkpoint never
    ends in .tmp, so nothing a resume needs is touched."""
    run_dir = Path(run_dir)
    removed = []
    for folder in (run_dir, run_dir / CHECKPOINTS, run_dir / "final"):
        if not folder.is_dir():
            continue
        for leftover in sorted(folder.glob("*.tmp")):
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover)
            else:
                leftover.unlink()
            removed.append(leftover)
    return removed


def prune_checkpoints(root: Path, keep: int) -> None:
    """Delete all but the `keep` newest complete checkpoints (never the one latest.json names)."""
    latest = read_latest(root)
    complete = sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in complete[: max(len(complete) - max(keep, 1), 0)]:
        if latest is None or old != latest:
            shutil.rmtree(old)


def optimizer_state_to_tensors(optimizer: torch.optim.Optimizer, parameter_names: dict) -> tuple[dict, dict]:
    """Flatten an optimizer's state dict: tensors keyed "<parameter name>/<key>", the rest as JSON.

    torch keys optimizer state by each parameter's position in the param groups; we translate positions
    to names, so loading checks that every moment goes back to the parameter it belongs to.
    """
    full = optimizer.state_dict()
    position_to_name = {}
    position = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            position_to_name[position] = parameter_names[p]
            position += 1
    tensors, scalars = {}, {}
    for position, values in full["state"].items():
        name = position_to_name[position]
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{name}/{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars[f"{name}/{key}"] = value
    groups = []
    for group in full["param_groups"]:
        settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items() if k != "params"}
        groups.append({**settings, "params": [position_to_name[i] for i in group["params"]]})
    return tensors, {"param_groups": groups, "scalars": scalars}


def capture_rng(generators: dict[str, torch.Generator]) -> tuple[dict, dict]:
    """Every random state a run touches: torch (CPU and each CUDA device), numpy, Python, named generators."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = state
    for name, generator in generators.items():
        tensors[f"generator_{name}"] = generator.get_state()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    tensors["numpy_keys"] = torch.from_numpy(keys.astype(np.int64))
    version, python_state, gauss = random.getstate()
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(cached)], "python": [version, list(python_state), gauss]}
    return tensors, meta


# ----------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------


def read_latest(root: Path) -> Path | None:
    """The folder latest.json names (None without latest.json); it must be a folder inside `root`."""
    pointer = root / LATEST
    if not pointer.exists():
        return None
    try:
        latest = read_json_file(pointer)
        json_field(latest, "step", pointer, "int >= 0", default=None)
        return path_inside(root, json_field(latest, "directory", pointer, "str"), f"{pointer}: directory")
    except ValueError as error:
        raise ValueError(f"{error}; delete {pointer.name} to fall back to the newest complete checkpoint") from None


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint folder to resume from: the one latest.json names, else the newest complete one."""
    root = Path(run_dir) / CHECKPOINTS
    latest = read_latest(root) if root.exists() else None
    if latest is not None and latest.is_dir():
        return latest
    complete = sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
    return complete[-1] if complete else None


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint folder; a missing file is an error naming it."""
    path = Path(path)
    files = {name: path / name for name in
             ("weights.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json")}
    for file in files.values():
        if not file.exists():
            raise FileNotFoundError(f"{file}: missing — {path} is not a complete checkpoint")

    state = check_state(read_json_file(files["state.json"]), files["state.json"])
    rng = read_safetensors(files["rng.safetensors"])
    for name in ("torch_cpu", "numpy_keys"):
        if name not in rng:
            raise ValueError(f"{files['rng.safetensors']}: no tensor {name!r}; the checkpoint is incomplete")
    return Checkpoint(path=path, step=state["step"],
                      weights=read_safetensors(files["weights.safetensors"], floating=True),
                      optimizer_tensors=read_safetensors(files["optimizer.safetensors"], floating=True),
                      rng_tensors=rng, state=state)


def check_state(state: dict, where: Path) -> dict:
    """The shape of state.json that resuming relies on; a wrong type names the key."""
    json_field(state, "step", where, "int >= 0")
    for key in ("optimizer", "rng", "loop", "scheduler"):
        json_field(state, key, where, "object")
    for key in ("step", "micro_batches", "tokens"):  # the loop's counters: where the data order resumes
        json_field(state["loop"], key, where, "int >= 0", section="loop")
    for i, group in enumerate(json_field(state["optimizer"], "param_groups", where, "list", section="optimizer")):
        if not isinstance(group, dict):
            raise ValueError(f"{where}: optimizer.param_groups[{i}] must be a JSON object, got {group!r}")
        json_field(group, "params", where, "str list", section=f"optimizer.param_groups[{i}]")
    json_field(state["optimizer"], "scalars", where, "object", section="optimizer")
    for key, size in (("numpy", 4), ("python", 3)):
        if len(json_field(state["rng"], key, where, "list", section="rng")) != size:
            raise ValueError(f"{where}: rng.{key} must be a list of {size} items")
    return state


def load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], expected: list[str], where: str) -> None:
    """Copy checkpoint tensors into the model's parameters; the set of names and each shape must match."""
    params = dict(model.named_parameters())
    missing = [n for n in expected if n not in weights]
    extra = [n for n in weights if n not in expected]
    if missing or extra:
        raise ValueError(f"{where}: checkpoint tensors do not match this run's trainable set "
                         f"(missing {missing[:3]}, unexpected {extra[:3]}); written with another method or task?")
    with torch.no_grad():
        for name in expected:
            if params[name].shape != weights[name].shape:
                raise ValueError(f"{where}: tensor {name!r} has shape {tuple(weights[name].shape)}, "
                                 f"the model has {tuple(params[name].shape)}")
            params[name].copy_(weights[name])


def load_optimizer_state(optimizer: torch.optim.Optimizer, parameter_names: dict, checkpoint: Checkpoint) -> None:
    """Inverse of optimizer_state_to_tensors, checking that the parameter groups hold the same names."""
    meta = checkpoint.state["optimizer"]
    if len(meta["param_groups"]) != len(optimizer.param_groups):
        raise ValueError(f"{checkpoint.path}: optimizer has {len(meta['param_groups'])} parameter groups, "
                         f"this run builds {len(optimizer.param_groups)}; resume with the same config")
    name_to_position, groups, position = {}, [], 0
    for saved, group in zip(meta["param_groups"], optimizer.param_groups):
        names = [parameter_names[p] for p in group["params"]]
        if names != saved["params"]:
            diff = sorted(set(names) ^ set(saved["params"]))[:3] or names[:1]
            raise ValueError(f"{checkpoint.path}: optimizer parameter group differs from this run's (e.g. {diff})")
        settings = {k: (tuple(v) if k == "betas" else v) for k, v in saved.items() if k != "params"}
        groups.append({**settings, "params": list(range(position, position + len(names)))})
        for name in names:
            name_to_position[name] = position
            position += 1
    state: dict[int, dict] = {}
    tensors_file, state_file = checkpoint.path / "optimizer.safetensors", checkpoint.path / "state.json"
    shapes = {name: tuple(p.shape) for p, name in parameter_names.items()}
    for where, entries in ((tensors_file, checkpoint.optimizer_tensors), (state_file, meta["scalars"])):
        for key, value in entries.items():
            name, _, field = key.rpartition("/")
            if name not in name_to_position:
                raise ValueError(f"{where}: optimizer state {key!r} is not \"<parameter>/<field>\" for a "
                                 "parameter of this run")
            if torch.is_tensor(value) and value.dim() > 0 and tuple(value.shape) != shapes[name]:
                # moments have the parameter's shape; counters such as "step" are scalars
                raise ValueError(f"{where}: optimizer state {key!r} has shape {tuple(value.shape)}; expected the "
                                 f"parameter's {shapes[name]} (a moment) or a scalar (a counter such as step)")
            state.setdefault(name_to_position[name], {})[field] = value
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError, TypeError, RuntimeError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(f"{tensors_file}: the optimizer state does not load ({reason}); the checkpoint is "
                         "corrupt or from another optimizer") from None


def restore_rng(checkpoint: Checkpoint, generators: dict[str, torch.Generator] | None = None) -> None:
    """Put every random generator back in the state it had when the checkpoint was written."""
    tensors, meta = checkpoint.rng_tensors, checkpoint.state["rng"]
    for name in generators or {}:
        if f"generator_{name}" not in tensors:
            raise ValueError(f"{checkpoint.path}: no state for random generator {name!r}")
    try:
        torch.set_rng_state(tensors["torch_cpu"])
        cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda)
        for name, generator in (generators or {}).items():
            generator.set_state(tensors[f"generator_{name}"])
        kind, pos, has_gauss, cached = meta["numpy"]
        np.random.set_state((kind, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
        version, python_state, gauss = meta["python"]
        random.setstate((version, tuple(python_state), gauss))
    except (ValueError, TypeError, RuntimeError, IndexError) as error:  # a tensor of the wrong dtype or size
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(f"{checkpoint.path / 'rng.safetensors'}: a random generator state does not load "
                         f"({reason}); the checkpoint is corrupt (this file or the rng entry of state.json)") from None

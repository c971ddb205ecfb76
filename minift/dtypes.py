"""Dtype names: the one table that turns "bfloat16" in a config or on the command line into a torch.dtype.

Lesson
------
Configs, the CLI and checkpoint metadata name dtypes as strings; torch wants objects. One table, read in
both directions, keeps every place that accepts a dtype name accepting the same names:

    "float32"  <->  torch.float32     full precision: the CPU default, and what training keeps master weights in
    "bfloat16" <->  torch.bfloat16    8-bit exponent like float32: the GPU training dtype (emulated on AVX2 CPUs)
    "float16"  <->  torch.float16     5-bit exponent: needs loss scaling to train
"""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str | torch.dtype | None, where: str = "dtype") -> torch.dtype | None:
    """The torch dtype called `name`; a torch.dtype passes through, None (no choice made) stays None.

    An unknown name is an error that names `where` (the option or config key) and lists the choices.
    """
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"{where} = {name!r}; expected one of {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """The name of `dtype` as written in configs and checkpoint metadata: torch's own ("bfloat16", "uint8").

    The table's names are torch's attribute names, so this is the inverse of parse_dtype on the table and
    still gives a readable name for any other dtype in an error message.
    """
    return str(dtype).removeprefix("torch.")

"""The two code tables of NF4: the 16 NormalFloat values and the 256-entry dynamic map of double quantization.

Lesson
------
An NF4 weight is a 4-bit index into NF4_CODE times a block scale; with double quantization the block scale
is itself an 8-bit index into DYNAMIC_MAP times a nested scale plus an offset (minift/quant/nf4.py, the
format, explains both; kernels/nf4_dequantize_kernel.py decodes them):

    NF4_CODE (16,)      16 quantiles of N(0, 1) scaled to [-1, 1], with an exact 0 at index 7 (QLoRA §3)
    DYNAMIC_MAP (256,)  the signed 8-bit dynamic map of Dettmers (2016): a float with a variable exponent

Both are written by hand here and rebuilt by `build_nf4_code` / `build_dynamic_map` from their definitions
(the tests check both against bitsandbytes' own tables). They sit in minift.kernels, the lowest layer that
needs them, because every kernel's pure-torch reference decodes with them; minift.quant, one layer up,
imports them from here.
"""

from __future__ import annotations

import torch


def build_nf4_code(outer_probability: float = 0.9677083) -> torch.Tensor:
    """Rebuild the 16 NF4 codes from normal quantiles (QLoRA §3), the way bitsandbytes does, in float32.

    The probabilities are made in float32 (torch.linspace), the quantiles Phi^-1 in float64, then the
    values are rounded to float32 and divided by their maximum in float32.
    """
    positive_p = torch.linspace(outer_probability, 0.5, 9)[:-1]  # (8,) float32, 0.5 itself excluded
    negative_p = torch.linspace(outer_probability, 0.5, 8)[:-1]  # (7,)
    positive = torch.special.ndtri(positive_p.double()).float()  # (8,)  Phi^-1(p) > 0
    negative = -torch.special.ndtri(negative_p.double()).float()  # (7,)
    values = torch.cat([negative, torch.zeros(1), positive]).sort().values  # (16,)
    return values / values.max()


def build_dynamic_map() -> torch.Tensor:
    """The signed 8-bit dynamic map (Dettmers 2016): 256 sorted values in [-1, 1] used for double quant.

    Like a float with a variable split between exponent and fraction: decade 10^(e-6), e = 0..6, holds
    2^e linearly spaced magnitudes (the centres of 2^e equal steps from 0.1 to 1), each with both signs.
    2 * (1 + 2 + ... + 64) = 254 values, plus 0 and 1.0 = 256. Same float32 arithmetic as
    bitsandbytes.functional.create_dynamic_map(signed=True), so the table is identical.
    """
    values = [0.0, 1.0]
    for exponent in range(7):
        edges = torch.linspace(0.1, 1.0, 2**exponent + 1)  # (2^e + 1,) float32
        centres = (edges[:-1] + edges[1:]) / 2.0  # (2^e,)
        magnitudes = 10.0 ** (exponent - 6) * centres  # (2^e,) float32
        values += magnitudes.tolist() + (-magnitudes).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)  # (256,)


# bitsandbytes' NF4 table (REFERENCE.md); tests check it equals build_nf4_code() and bitsandbytes' own.
NF4_CODE = torch.tensor(
    [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
     -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
     0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
     0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0],
    dtype=torch.float32,
)  # (16,)
DYNAMIC_MAP = build_dynamic_map()  # (256,)

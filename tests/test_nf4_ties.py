"""Near-tie rounding: our 8-bit and 4-bit codes equal bitsandbytes 0.50's CPU codes byte for byte.

Values are built exactly on, and a few float32 ulps either side of, every midpoint between two codes (and, for
the 8-bit dynamic map, of every rounding boundary of bitsandbytes' 65,536-point grid), where any difference in
the rounding rule shows. The old rule (nearest code, ties to the lower one) fails the 8-bit checks.
"""

import pytest
import torch

from minift.quant import DYNAMIC_MAP, NF4_CODE, quantize_nf4
from minift.quant.nf4 import LUT_SIZE, lut_code, nearest_code, quantize_absmax_8bit

ULPS = 4


@pytest.fixture(scope="module")
def bnbf():
    functional = pytest.importorskip("bitsandbytes.functional")
    with torch._dynamo.config.patch(disable=True):  # bnb compiles some CPU helpers otherwise
        yield functional


def around(points: torch.Tensor, ulps: int = ULPS) -> torch.Tensor:
    """float32 `points` and their neighbours up to `ulps` representable floats away on each side."""
    out, up, down = [points], points.clone(), points.clone()
    for _ in range(ulps):
        up, down = torch.nextafter(up, torch.tensor(2.0)), torch.nextafter(down, torch.tensor(-2.0))
        out += [up, down]
    return torch.cat(out)


def midpoints(code: torch.Tensor) -> torch.Tensor:
    return (code[:-1] + code[1:]) / 2  # float32, as bitsandbytes computes them


def hard_8bit_values() -> torch.Tensor:
    """Scaled values in [-1, 1] next to the dynamic map's midpoints and next to the grid's rounding boundaries."""
    i = torch.arange(LUT_SIZE - 1, dtype=torch.float64)
    boundaries = (-1 + 2 * (i + 0.5) / (LUT_SIZE - 1)).float()  # where the grid index steps up
    near_midpoints = (boundaries[:, None] - midpoints(DYNAMIC_MAP)[None, :].double()).abs().min(1).values < 3e-5
    return around(torch.cat([midpoints(DYNAMIC_MAP), boundaries[near_midpoints]])).clamp(-1, 1)


def in_unit_blocks(values: torch.Tensor, blocksize: int = 256) -> torch.Tensor:
    """Blocks of `blocksize` whose first element is 1.0: absmax 1, so bnb's x * (1/absmax) leaves values as they are."""
    rows = -(-values.numel() // (blocksize - 1))
    padded = torch.zeros(rows * (blocksize - 1))
    padded[: values.numel()] = values
    return torch.cat([torch.ones(rows, 1), padded.view(rows, blocksize - 1)], dim=1).reshape(-1)


def test_8bit_codes_at_midpoints_equal_bitsandbytes(bnbf):
    x = in_unit_blocks(hard_8bit_values())
    theirs, state = bnbf.quantize_blockwise(x, code=DYNAMIC_MAP, blocksize=256)
    assert torch.equal(state.absmax, torch.ones_like(state.absmax))
    assert torch.equal(lut_code(x, DYNAMIC_MAP).to(torch.uint8), theirs)
    old = nearest_code(x, DYNAMIC_MAP).to(torch.uint8)  # the old rule
    assert (old != theirs).sum() > 100, "the nearest-code rule should disagree with bnb's table here"


def test_double_quantization_equals_bitsandbytes_with_scaling(bnbf):
    """The same hard values through quantize_absmax_8bit, blocks scaled by x * (1/absmax) and shifted by the mean."""
    values = hard_8bit_values()
    g = torch.Generator().manual_seed(0)
    values = values[torch.randperm(values.numel(), generator=g)]
    scale = torch.rand(-(-values.numel() // 255), generator=g) * 0.02 + 0.001  # per 256-block (255 values + 1)
    centred = in_unit_blocks(values).view(-1, 256) * scale[:, None]  # (blocks, 256), absmax = scale
    absmax = (centred + 0.03).reshape(-1)[:-7]  # plausible positive block scales; a partial last block
    codes, nested_absmax, offset = quantize_absmax_8bit(absmax)
    theirs, state = bnbf.quantize_blockwise(absmax - offset, blocksize=256)  # as bnb's quantize_4bit calls it
    assert torch.equal(nested_absmax, state.absmax)
    assert torch.equal(codes, theirs), f"{(codes != theirs).sum().item()} of {codes.numel()} 8-bit codes differ"
    scaled = ((absmax - offset).view(-1) * (1.0 / nested_absmax).repeat_interleave(256)[: absmax.numel()])
    assert (nearest_code(scaled.clamp(-1, 1), DYNAMIC_MAP).to(torch.uint8) != theirs).any(), "test too easy"


def test_nf4_codes_at_midpoints_equal_bitsandbytes(bnbf):
    """4-bit: scaled values on and near the 15 NF4 midpoints, in full blocks (x * (1/a)) and a partial one (x / a)."""
    values = around(midpoints(NF4_CODE), 2 * ULPS)  # (255,)
    g = torch.Generator().manual_seed(1)
    for a in (1.0, *(torch.rand(5, generator=g) * 3 + 0.05).tolist()):
        x = torch.cat([torch.tensor([a]), values * a, torch.tensor([-a]), values[:17] * a])  # 64-blocks, last partial
        for double_quant in (False, True):
            q = quantize_nf4(x, blocksize=64, double_quant=double_quant)
            packed, state = bnbf.quantize_4bit(x, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
            assert torch.equal(q.packed, packed), f"absmax {a}"
            assert torch.equal(q.absmax, state.absmax), f"absmax {a}"

"""NF4 quantize / dequantize: ours vs bitsandbytes 0.50 on the CPU, bit for bit.

bitsandbytes.functional.quantize_4bit(quant_type="nf4", compress_statistics=...) is run on the same
random tensors (float32, bfloat16, float16; full blocks, a partial last block, odd element counts;
blocksizes 32..4096). 4-bit codes, the 8-bit codes of double quantization (which follow bitsandbytes'
65,536-point lookup table, see tests/test_nf4_ties.py for values on and next to midpoints) and all float32
statistics must be identical.
"""

import pytest
import torch

from minift.quant import (
    DYNAMIC_MAP,
    NF4_CODE,
    NF4Tensor,
    build_dynamic_map,
    build_nf4_code,
    dequantize,
    nf4_nbytes,
    quantize_nf4,
)
from minift.quant.nf4 import VALID_BLOCKSIZES, dequantize_cpu, nearest_code, unpack_nibbles


@pytest.fixture(scope="module")
def bnbf():
    """bitsandbytes.functional, with torch.compile off: bnb compiles some CPU helpers, which costs seconds."""
    functional = pytest.importorskip("bitsandbytes.functional")
    with torch._dynamo.config.patch(disable=True):
        yield functional


def bnb_dequantize(bnbf, packed, state):
    """bitsandbytes' dequantize_4bit, avoiding its AVX-512 CPU kernel where that kernel is wrong.

    With AVX-512 (not on every machine) bnb 0.50 indexes absmax per row, which is only right when the
    last dimension is a multiple of the blocksize; there we call bnb's own pure-torch default kernel.
    """
    shape = state.shape
    avx512 = torch.backends.cpu.get_cpu_capability() == "AVX512"
    if avx512 and shape[-1] % state.blocksize and shape[-1] % 16 == 0:
        from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

        absmax = state.absmax
        if state.nested:
            absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
        code = bnbf.get_4bit_type("nf4", device="cpu")
        return _dequantize_4bit_compute(packed.reshape(-1), absmax, code, state.blocksize, shape, state.dtype)
    return bnbf.dequantize_4bit(packed, state)


# ----------------------------------------------------------------------------------- code tables


def test_nf4_code_rebuilt_from_normal_quantiles():
    code = build_nf4_code()
    assert code.dtype == torch.float32 and torch.equal(code, NF4_CODE)
    assert (NF4_CODE < 0).sum() == 7 and (NF4_CODE > 0).sum() == 8 and NF4_CODE[7] == 0
    assert NF4_CODE[0] == -1 and NF4_CODE[-1] == 1 and (NF4_CODE.diff() > 0).all()


def test_code_tables_equal_bitsandbytes(bnbf):
    assert torch.equal(NF4_CODE, bnbf.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(DYNAMIC_MAP, bnbf.create_dynamic_map(signed=True))
    assert torch.equal(build_dynamic_map(), DYNAMIC_MAP) and DYNAMIC_MAP.shape == (256,)


@pytest.mark.parametrize("code", [NF4_CODE, DYNAMIC_MAP], ids=["nf4", "dynamic"])
def test_nearest_code_is_the_nearest(code):
    values = torch.rand(20000, generator=torch.Generator().manual_seed(0)) * 2 - 1
    values = torch.cat([values, values * 1e-4])  # also the dense region of the dynamic map near 0
    brute_force = (values[:, None].double() - code[None, :].double()).abs().argmin(dim=1)
    assert torch.equal(nearest_code(values, code).long(), brute_force)


# ----------------------------------------------------------------------------------- parity

SHAPES = [(64, 64), (7, 33), (3, 48), (1001,), (5, 2, 37), (130, 64)]  # partial blocks, odd counts, 2 nested blocks
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double"])
@pytest.mark.parametrize("blocksize", [32, 64, 128, 4096])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quantize_matches_bitsandbytes(bnbf, dtype, blocksize, double_quant):
    generator = torch.Generator().manual_seed(blocksize)
    for shape in SHAPES:
        x = (torch.randn(shape, generator=generator) * 0.05).to(dtype)
        x.view(-1)[3] = 0.4  # an outlier, as in real weights
        packed, state = bnbf.quantize_4bit(x, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4")
        q = quantize_nf4(x, blocksize=blocksize, double_quant=double_quant)
        where = f"{dtype} {shape} blocksize {blocksize}"

        assert torch.equal(q.packed, packed), f"4-bit codes differ: {where}"
        assert q.shape == x.shape and q.dtype == dtype
        # dequantizing bitsandbytes' own state gives bitsandbytes' values exactly
        expected = bnb_dequantize(bnbf, packed, state)
        bnb_state = q if not double_quant else NF4Tensor(packed, state.absmax, x.shape, dtype, blocksize,
                                                         nested_absmax=state.state2.absmax, offset=state.offset)
        assert torch.equal(dequantize(bnb_state), expected), f"dequantize differs: {where}"
        if not double_quant:
            assert q.absmax.dtype == torch.float32 and torch.equal(q.absmax, state.absmax), where
            assert torch.equal(q.dequantize(), expected), where
            continue

        assert torch.equal(q.offset, state.offset) and torch.equal(q.nested_absmax, state.state2.absmax), where
        assert torch.equal(q.absmax, state.absmax), f"8-bit codes differ: {where}"
        assert torch.equal(q.dequantize(), expected), where


def test_exact_midpoints_go_to_the_lower_code(bnbf):
    midpoints = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2  # float32, as bitsandbytes computes them
    above = torch.nextafter(midpoints, torch.ones(15))
    x = torch.cat([torch.ones(1), midpoints, above, -torch.ones(1)])  # absmax 1: scaling is exact
    q = quantize_nf4(x, blocksize=32, double_quant=False)
    codes = unpack_nibbles(q.packed, x.numel())
    assert torch.equal(codes[1:16].long(), torch.arange(15)), "a midpoint must take the lower code"
    assert torch.equal(codes[16:31].long(), torch.arange(1, 16)), "just above a midpoint takes the upper code"
    assert torch.equal(q.packed, bnbf.quantize_4bit(x, blocksize=32, quant_type="nf4")[0])


def test_partial_block_divides_while_full_blocks_multiply(bnbf):
    """Find x, a with x * (1/a) and x / a on opposite sides of a midpoint; place x in a full and a partial block."""
    midpoints = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2
    a = torch.rand(2000, generator=torch.Generator().manual_seed(1)) * 3 + 0.1  # (2000,) candidate absmax
    x = midpoints[None, :] * a[:, None]  # (2000, 15) values on (or next to) a midpoint after scaling
    differ = nearest_code(x * (1 / a[:, None]), NF4_CODE) != nearest_code(x / a[:, None], NF4_CODE)
    row, col = differ.nonzero()[0].tolist()
    a, x = a[row], x[row, col]
    tensor = torch.zeros(66)  # one full block of 64, then a partial block of 2
    tensor[0], tensor[1], tensor[64], tensor[65] = a, x, a, x
    q = quantize_nf4(tensor, blocksize=64, double_quant=False)
    assert torch.equal(q.packed, bnbf.quantize_4bit(tensor, blocksize=64, quant_type="nf4")[0])
    codes = unpack_nibbles(q.packed, tensor.numel())
    assert codes[1] != codes[65], "the same (x, a) must quantize differently in the full and the partial block"


def test_zero_and_constant_blocks(bnbf):
    zeros = torch.zeros(70)  # a zero full block (absmax 0) and a zero partial block (bnb clamps to 1e-38)
    q = quantize_nf4(zeros, blocksize=64, double_quant=False)
    packed, state = bnbf.quantize_4bit(zeros, blocksize=64, quant_type="nf4")
    assert torch.equal(q.packed, packed) and torch.equal(q.absmax, state.absmax)
    assert torch.equal(q.dequantize(), zeros)
    ones = torch.ones(300, 64)  # every absmax equals the mean: the nested blocks are all zero
    q = quantize_nf4(ones, blocksize=64, double_quant=True)
    packed, state = bnbf.quantize_4bit(ones, blocksize=64, compress_statistics=True, quant_type="nf4")
    assert torch.equal(q.packed, packed) and torch.equal(q.absmax, state.absmax)
    assert torch.equal(q.nested_absmax, state.state2.absmax) and torch.equal(q.dequantize(), ones)


# ----------------------------------------------------------------------------------- storage and API


def test_bytes_per_parameter():
    for shape, blocksize, double_quant in [((7, 33), 64, True), ((300, 64), 32, True), ((1001,), 128, False)]:
        q = quantize_nf4(torch.randn(shape), blocksize=blocksize, double_quant=double_quant)
        assert q.nbytes == nf4_nbytes(q.numel(), blocksize, double_quant)
    n = 4096 * 4096
    assert 8 * nf4_nbytes(n, double_quant=False) / n == 4.5
    bits = 8 * nf4_nbytes(n) / n
    assert bits == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-5) and round(bits, 3) == 4.127
    assert round(2 * n / nf4_nbytes(n), 2) == 3.88  # vs bf16


def test_dequantize_dtypes_and_device_moves():
    x = torch.randn(5, 37, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(0))
    q = quantize_nf4(x)
    assert q.dequantize().dtype == torch.bfloat16
    as_float32 = q.dequantize(torch.float32)
    assert torch.equal(q.dequantize(torch.float64), as_float32.double())
    assert torch.equal(q.dequantize(), as_float32.bfloat16())
    moved = q.to("cpu")
    assert torch.equal(moved.dequantize(), q.dequantize()) and moved.device.type == "cpu"
    error = (q.dequantize(torch.float32) - x.float()).abs().max()
    widest_gap = (NF4_CODE[1:] - NF4_CODE[:-1]).max()  # 0.304, between -1 and -0.696 (1 - 0.723 was too small:
    assert error <= x.float().abs().max() * widest_gap / 2 + 1e-2  # unseeded, ~1 draw in 12 failed)
    assert "double-quantized" in repr(q)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
def test_cpu_chunked_dequantize_is_the_plain_formula(bnbf, dtype):
    """dequantize_cpu (one byte, 2 codes per lookup, chunked) against the formula done naively:
    unpack each nibble, look it up, multiply by its block's float32 scale, cast. Several chunks, chunks that
    end mid-tensor, partial last blocks, odd element and byte counts, packed data at an odd address."""
    generator = torch.Generator().manual_seed(16)
    for shape, blocksize in [((1,), 64), ((3,), 32), ((6,), 32), ((7, 33), 32), ((130, 64), 64), ((9, 1001), 128),
                             ((2, 4096), 4096), ((3, 4097), 4096)]:
        x = torch.randn(shape, generator=generator)
        for double_quant in (False, True):
            q = quantize_nf4(x, blocksize=blocksize, double_quant=double_quant)
            codes = unpack_nibbles(q.packed, x.numel())
            scales = q.block_scales().repeat_interleave(blocksize)[: x.numel()]
            expected = (NF4_CODE[codes] * scales).to(dtype).view(shape)
            odd_address = torch.cat([q.packed.new_zeros(1, 1), q.packed])[1:]  # same bytes, data_ptr odd
            for chunk in (32, 4096, 1 << 15, 1 << 18):
                where = f"{shape} blocksize {blocksize} double_quant {double_quant} chunk {chunk}"
                assert torch.equal(dequantize_cpu(q, dtype, chunk), expected), where
                moved = NF4Tensor(odd_address, q.absmax, q.shape, q.dtype, blocksize, q.nested_absmax, q.offset)
                assert torch.equal(dequantize_cpu(moved, dtype, chunk), expected), where
    # and, on tensors of several chunks, bitsandbytes' own dequantize of the same state; 1024 x 1024 float32
    # values (4 MiB) put the output on huge pages (minift/quant/huge_pages.py)
    source_dtype = dtype if dtype != torch.float64 else torch.float32
    for shape, double_quant in [((300, 256), False), ((1024, 1024), True)]:
        x = (torch.randn(shape, generator=generator) * 0.02).to(source_dtype)
        packed, state = bnbf.quantize_4bit(x, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
        q = quantize_nf4(x, double_quant=double_quant)
        assert torch.equal(q.packed, packed) and torch.equal(q.absmax, state.absmax)
        expected = bnb_dequantize(bnbf, packed, state)
        assert torch.equal(q.dequantize(), expected), shape
        for chunk in (1 << 15, 1 << 20):
            assert torch.equal(dequantize_cpu(q, source_dtype, chunk), expected), (shape, chunk)


@pytest.mark.parametrize("blocksize", [16, 48, 8192, 0])
def test_rejects_blocksizes_bitsandbytes_rejects(bnbf, blocksize):
    with pytest.raises(ValueError, match="blocksize"):
        quantize_nf4(torch.randn(64), blocksize=blocksize)
    with pytest.raises((ValueError, RuntimeError)):
        bnbf.quantize_4bit(torch.randn(64), blocksize=blocksize, quant_type="nf4")
    for accepted in VALID_BLOCKSIZES:  # and everything bitsandbytes accepts works
        assert quantize_nf4(torch.randn(8), blocksize=accepted).blocksize == accepted


def test_bad_inputs_give_clear_errors():
    with pytest.raises(ValueError, match="int64"):
        quantize_nf4(torch.arange(64))
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_nf4(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="empty"):
        quantize_nf4(torch.zeros(0, 4))
    q = quantize_nf4(torch.randn(10, 10), double_quant=False)
    with pytest.raises(ValueError, match=r"packed must be uint8 of shape \(50, 1\).*found torch.uint8 \(49, 1\)"):
        NF4Tensor(q.packed[:49], q.absmax, q.shape, q.dtype)
    with pytest.raises(ValueError, match=r"absmax must have shape \(2,\)"):
        NF4Tensor(q.packed, q.absmax[:1], q.shape, q.dtype)
    with pytest.raises(ValueError, match="uint8 absmax codes and an offset"):
        NF4Tensor(q.packed, q.absmax, q.shape, q.dtype, nested_absmax=torch.ones(1))


def test_keep_out_of_compile_marks_the_eager_functions_once():
    """Importing minift must not import torch._dynamo (slow); compiling swaps in torch.compiler.disable'd twins."""
    import subprocess
    import sys

    code = ("import sys, minift.quant.nf4 as nf4; assert 'torch._dynamo' not in sys.modules, 'dynamo at import'; "
            "plain = nf4.dequantize_cpu; nf4.keep_out_of_compile(); first = nf4.dequantize_cpu; "
            "nf4.keep_out_of_compile(); assert nf4.dequantize_cpu is first is not plain; "
            "assert nf4.lut_code._minift_eager and first._minift_eager")
    subprocess.run([sys.executable, "-c", code], check=True)

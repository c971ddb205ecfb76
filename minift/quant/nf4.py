"""NF4: 4-bit NormalFloat quantization, byte-for-byte the way bitsandbytes stores it.

Lesson
------
QLoRA (Dettmers et al. 2023, §3) freezes a pretrained model in 4 bits and trains LoRA adapters on top.
Three ideas make 4 bits enough:

1. NormalFloat codes (§3, "4-bit NormalFloat"). Pretrained weights are roughly normal, so instead of 16
   evenly spaced levels we use 16 *quantiles* of N(0, 1): each code then covers about the same share of
   the weights. To have an exact 0, the positive and negative halves are built separately and glued:

       positive: Phi^-1(p) for 8 probabilities p evenly spaced from 0.9677083 down to 0.5 (0.5 excluded)
       negative: -Phi^-1(p) for 7 probabilities evenly spaced over the same range (0.5 excluded)
       codes = sorted(negative + [0] + positive) / max          -> 16 values in [-1, 1]

         -1.0  -.696  -.525  -.395  -.284  -.185  -.091  0  .080  .161  .246  .338  .441  .563  .723  1.0
   index   0     1      2      3      4      5      6    7   8     9     10    11    12    13    14   15

   `build_nf4_code()` redoes this with torch.special.ndtri (Phi^-1) and reproduces bitsandbytes' table bit for
   bit; NF4_CODE is that table written out. Both tables live in kernels/nf4_codes.py, below this module,
   because the Triton kernels' references decode with them too.

2. Blockwise absmax scaling. The flattened tensor is cut into blocks of `blocksize` (64) consecutive
   elements; each block stores absmax = max |x| in float32 and every element becomes the index of the
   code nearest to x / absmax. One outlier then spoils only its own block.

       x (n,) -> blocks (n_blocks, 64) -> x * (1 / absmax) in [-1, 1] -> nearest code index (0..15)
       two indices per byte, the first element in the HIGH nibble:  byte = (code[2i] << 4) | code[2i+1]

   Details that matter for bit-exactness with bitsandbytes 0.50 (read from its CPU/default backend):
   inputs of any dtype are upcast to float32 first; full blocks are scaled by multiplying with the
   float32 reciprocal 1/absmax, the partial last block by dividing by absmax (x * (1/a) and x / a can
   differ in the last bit, and a value on a midpoint can fall either way); an exact midpoint between two
   codes goes to the LOWER code; an odd element count is padded with index 7 (the code 0.0); an all-zero
   block stores absmax 0 (full block) or 1e-38 (partial last block, which bitsandbytes clamps).

3. Double quantization (§3, "Double Quantization"). One float32 absmax per 64 weights costs
   32 / 64 = 0.5 bits per weight. QLoRA quantizes the absmax values themselves: subtract their mean
   (`offset`), then quantize blockwise (blocks of 256) to 8 bits with the signed dynamic map of
   Dettmers (2016), keeping one float32 scale per 256 absmax values:

       absmax (n_blocks,) f32 --(- offset)--> blocks of 256 --> uint8 codes + nested_absmax (n_blocks/256,) f32
       block scale = DYNAMIC_MAP[code] * nested_absmax + offset

   Bits per weight (blocksize 64, large tensor):
       plain NF4:     4 + 32 / 64                      = 4.5     bits  (0.5625 bytes)
       double quant:  4 + 8 / 64 + 32 / (64 * 256)     = 4.127   bits  (0.5159 bytes)   vs 16 for bf16: 3.88x

   Which 8-bit code? Not simply the nearest one. bitsandbytes' CPU kernel (csrc/cpu_ops.cpp,
   quantize_cpu_impl, called through cquantize_blockwise_cpu_fp32) never compares a value with the map. It
   first snaps the scaled value s = x * (1/absmax) to a grid of 65,536 points over [-1, 1], all in float32:

       grid index  i = truncate(((clamp(s, -1, 1) + 1) * 0.5) * 65535 + 0.5)      (round half up)
       grid point  g_i = -1 + (2 * i) / 65535
       code        = a table built once (build_quantize_lut): the nearest map entry to g_i, i.e. the number
                     of float32 midpoints 0.5 * (map[k] + map[k+1]) strictly below g_i (a tie goes LOWER)

   So the code is decided by the grid point, not by s: a value up to half a grid step (1/65535 = 1.5e-5)
   past a midpoint can land on the far side of it, and near 0, where the map is denser than the grid, a
   few codes away. (In a Phi-3 test model one block scale lay 3e-8 from the midpoint of codes 59 and 60,
   on 59's side; its grid point lay on 60's side, and bitsandbytes stored 60.) `lut_code` does exactly
   these steps, vectorized. The index arithmetic as written and with a fused multiply-add give the same
   index for every float32 value within 8 ulps of each grid rounding boundary (checked), and the ARM path's
   single multiply by 32767.5 equals the two above (* 0.5 is exact), so the build does not matter.
   This rule is the CPU kernel's. bitsandbytes' CUDA kernel (csrc/kernels.cu, dQuantize<0>) instead runs
   a 7-step binary search over the map and compares with float32 midpoints, so it picks the truly nearest
   code except at exact ties, which go to whichever neighbour the search ended on. Both can be read, only
   the CPU one can be checked here (no GPU), so minift follows the CPU kernel on every device: a CUDA build
   of bitsandbytes may differ in a rare 8-bit code (for a value within 1.5e-5 of a midpoint).
   The 4-bit codes have no such table on the CPU: bitsandbytes' CPU backend quantizes them in torch
   (backends/default/ops.py, quantize_4bit), with float32 midpoints and torch.bucketize, ties to the lower
   code, which is `nearest_code` below; its CUDA kernel (dQuantizeNF4) compares with decimal constants.
   All 4-bit codes and all float32 statistics agree with the CPU backend bit for bit.

`quantize_nf4` returns an NF4Tensor; `dequantize` (or `NF4Tensor.dequantize`) undoes it:
    value = NF4_CODE[index] * block_scale       (float32 product, then cast to the requested dtype)
On the CPU it decodes one packed byte (two weights) per lookup in a 2 KiB table, chunk by chunk, into
an output on 2 MiB pages (`dequantize_cpu`, minift/quant/huge_pages.py). Where the output's pages come
from decides most of the time: benchmarks/results/nf4_cpu.md compares it with bitsandbytes' C++ loop as
shipped and like with like, and says what bounds each (bitsandbytes keeps the 16 codes in one AVX-512
register; torch has no such lookup, so its decode takes several passes).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from minift.kernels.nf4_codes import DYNAMIC_MAP, NF4_CODE
from minift.quant.huge_pages import empty_on_huge_pages

VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes 0.50 accepts for 4-bit
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ZERO_CODE_INDEX = 7  # NF4_CODE[7] == 0.0; pads an odd element count
TINY_ABSMAX = 1e-38  # bitsandbytes clamps absmax to this before dividing, so all-zero blocks stay finite


def nearest_code(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of the sorted `code` for each value; an exact midpoint goes to the lower.

    torch.bucketize(x, midpoints) counts the midpoints strictly below x, which is exactly that rule.
    Midpoints are computed in float32, as bitsandbytes does.
    """
    midpoints = (code[:-1] + code[1:]) / 2  # (len(code) - 1,)
    return torch.bucketize(scaled, midpoints.to(scaled.device), out_int32=True)  # same shape, int32


LUT_SIZE = 65536  # bitsandbytes' CPU 8-bit quantizer snaps scaled values to this many grid points in [-1, 1]
LUT_CACHE: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(code) -> (code, its grid-point codes)


def lut_grid_codes(code: torch.Tensor) -> torch.Tensor:
    """(LUT_SIZE,) int32: for each grid point -1 + 2i/65535 (float32), the index of its nearest `code` entry.

    The table bitsandbytes' CPU kernel builds once per code map (build_quantize_lut): count the float32
    midpoints strictly below the grid point, so a grid point exactly on a midpoint takes the lower code.
    """
    i = torch.arange(LUT_SIZE, dtype=torch.float32)  # exact: integers below 2^24
    grid = -1.0 + (2.0 * i) / (LUT_SIZE - 1)  # (LUT_SIZE,) float32, each step rounded as in C
    return nearest_code(grid, code)


def lut_code(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """The code bitsandbytes' CPU kernel gives each scaled value: its grid point's code (module lesson).

    index = truncate(((clamp(s) + 1) * 0.5) * 65535 + 0.5), every step in float32; then a table lookup.
    """
    key = id(code)
    if key not in LUT_CACHE or LUT_CACHE[key][0] is not code:
        LUT_CACHE[key] = (code, lut_grid_codes(code.cpu()))
    table = LUT_CACHE[key][1].to(scaled.device)  # (LUT_SIZE,) int32
    index = (((scaled.float().clamp(-1, 1) + 1.0) * 0.5) * (LUT_SIZE - 1) + 0.5).to(torch.int32)  # truncates
    return table[index.long()]  # same shape as scaled, int32


# --------------------------------------------------------------------------------------------------
# The quantized tensor
# --------------------------------------------------------------------------------------------------


def check_blocksize(blocksize: int) -> None:
    if blocksize not in VALID_BLOCKSIZES:
        raise ValueError(f"NF4 blocksize={blocksize!r} is not supported; bitsandbytes accepts {VALID_BLOCKSIZES}")


@dataclass(eq=False)
class NF4Tensor:
    """A tensor stored as NF4: packed 4-bit codes plus per-block scales (optionally double-quantized)."""

    packed: torch.Tensor  # uint8 ((n + 1) // 2, 1), first element in the high nibble
    absmax: torch.Tensor  # float32 (n_blocks,), or uint8 (n_blocks,) codes when double-quantized
    shape: torch.Size  # original shape
    dtype: torch.dtype  # original dtype; dequantize() returns this by default
    blocksize: int = 64
    nested_absmax: torch.Tensor | None = None  # float32 (ceil(n_blocks / 256),)
    offset: torch.Tensor | None = None  # float32 scalar: absmax.mean() before nesting
    nested_blocksize: int = 256

    def __post_init__(self) -> None:
        self.shape = torch.Size(self.shape)
        check_blocksize(self.blocksize)
        n, n_blocks = self.numel(), self.n_blocks
        expected = ((n + 1) // 2, 1)
        if self.packed.dtype != torch.uint8 or tuple(self.packed.shape) != expected:
            raise ValueError(f"NF4Tensor.packed must be uint8 of shape {expected} for shape {tuple(self.shape)}, "
                             f"found {self.packed.dtype} {tuple(self.packed.shape)}")
        if tuple(self.absmax.shape) != (n_blocks,):
            raise ValueError(f"NF4Tensor.absmax must have shape ({n_blocks},) for {n} elements in blocks of "
                             f"{self.blocksize}, found {tuple(self.absmax.shape)}")
        if self.double_quant:
            n_nested = -(-n_blocks // self.nested_blocksize)
            if self.absmax.dtype != torch.uint8 or self.offset is None:
                raise ValueError("NF4Tensor with nested_absmax needs uint8 absmax codes and an offset, found "
                                 f"absmax {self.absmax.dtype}, offset {self.offset}")
            if tuple(self.nested_absmax.shape) != (n_nested,):
                raise ValueError(f"NF4Tensor.nested_absmax must have shape ({n_nested},), "
                                 f"found {tuple(self.nested_absmax.shape)}")
        elif self.absmax.dtype != torch.float32:
            raise ValueError(f"NF4Tensor.absmax must be float32 without double quant, found {self.absmax.dtype}")

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def n_blocks(self) -> int:
        return -(-self.numel() // self.blocksize)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def numel(self) -> int:
        return self.shape.numel()

    @property
    def nbytes(self) -> int:
        """Bytes of the stored data: codes + scales (+ nested scales and offset). Code tables not counted."""
        tensors = [self.packed, self.absmax, self.nested_absmax, self.offset]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def block_scales(self) -> torch.Tensor:
        """float32 (n_blocks,) absmax per block; un-nested (DYNAMIC_MAP[code] * nested_absmax + offset)."""
        if not self.double_quant:
            return self.absmax
        codes = self.absmax.long()  # (n_blocks,)
        values = DYNAMIC_MAP.to(self.device)[codes]  # (n_blocks,) in [-1, 1]
        nested = self.nested_absmax.repeat_interleave(self.nested_blocksize)[: self.n_blocks]  # (n_blocks,)
        return values * nested + self.offset  # (n_blocks,) float32

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize(self, dtype)

    def to(self, device: torch.device | str) -> NF4Tensor:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(self, packed=move(self.packed), absmax=move(self.absmax),
                       nested_absmax=move(self.nested_absmax), offset=move(self.offset))

    def __repr__(self) -> str:
        kind = "double-quantized " if self.double_quant else ""
        return (f"NF4Tensor(shape={tuple(self.shape)}, dtype={self.dtype}, blocksize={self.blocksize}, "
                f"{kind}{self.nbytes} bytes, device={self.device})")


# --------------------------------------------------------------------------------------------------
# Quantize
# --------------------------------------------------------------------------------------------------


def blockwise_absmax_scale(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split `flat` (n,) float32 into blocks; return (scaled values in [-1, 1] (n,), absmax (n_blocks,)).

    Full blocks multiply by the reciprocal 1/absmax, the partial last block divides (bitsandbytes' order).
    """
    n = flat.numel()
    n_full = n // blocksize
    full = flat[: n_full * blocksize].view(n_full, blocksize)  # (n_full, blocksize)
    absmax = full.abs().amax(dim=1)  # (n_full,)
    reciprocal = 1.0 / absmax.clamp(min=TINY_ABSMAX)  # (n_full,)
    scaled = (full * reciprocal[:, None]).clamp_(-1, 1).reshape(-1)  # (n_full * blocksize,)
    if n_full * blocksize < n:
        tail = flat[n_full * blocksize:]  # (rem,)
        tail_absmax = tail.abs().amax().clamp(min=TINY_ABSMAX)  # ()
        absmax = torch.cat([absmax, tail_absmax[None]])  # (n_blocks,)
        scaled = torch.cat([scaled, (tail / tail_absmax).clamp(-1, 1)])  # (n,)
    return scaled, absmax


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(n,) int codes 0..15 -> uint8 ((n + 1) // 2, 1), first code in the high nibble, padded with 7."""
    codes = codes.to(torch.uint8)
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_full((1,), ZERO_CODE_INDEX)])
    return ((codes[0::2] << 4) | codes[1::2]).unsqueeze(1)  # ((n + 1) // 2, 1)


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 (m, 1) -> int64 codes (n,): high nibble first, padding dropped."""
    flat = packed.reshape(-1)  # (m,)
    codes = torch.stack([flat >> 4, flat & 0x0F], dim=1).reshape(-1)  # (2m,)
    return codes[:n].long()


def quantize_absmax_8bit(absmax: torch.Tensor, nested_blocksize: int = 256):
    """Double quantization of the block scales: (uint8 codes (n_blocks,), nested_absmax, offset).

    Every 256-block (the last one may be partial) is scaled by multiplying with 1/max|absmax - offset|
    and coded through bitsandbytes' CPU lookup table (`lut_code`). A block that is all zeros gets code 0
    and nested absmax 0, as in bitsandbytes (any code decodes to 0).
    """
    offset = absmax.mean()  # () float32
    centred = absmax - offset  # (n_blocks,)
    n_blocks = centred.numel()
    n_nested = -(-n_blocks // nested_blocksize)
    padded = torch.zeros(n_nested * nested_blocksize, dtype=torch.float32, device=absmax.device)
    padded[:n_blocks] = centred
    blocks = padded.view(n_nested, nested_blocksize)  # (n_nested, 256); zero padding leaves max|.| alone
    nested_absmax = blocks.abs().amax(dim=1)  # (n_nested,)
    zero = nested_absmax == 0  # (n_nested,) all-zero blocks: bitsandbytes skips them, writing code 0
    reciprocal = torch.where(zero, 0.0, 1.0 / nested_absmax)  # (n_nested,); 0 keeps 0 * inf = NaN away
    scaled = (blocks * reciprocal[:, None]).clamp(-1, 1)  # (n_nested, 256)
    codes = lut_code(scaled, DYNAMIC_MAP)  # (n_nested, 256) int32
    codes[zero] = 0
    return codes.reshape(-1)[:n_blocks].to(torch.uint8), nested_absmax, offset


def quantize_nf4(tensor: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Tensor:
    """Quantize `tensor` to NF4 exactly as bitsandbytes.functional.quantize_4bit(quant_type="nf4",
    blocksize=blocksize, compress_statistics=double_quant) does (see the module lesson)."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"quantize_nf4 expects a torch.Tensor, got {type(tensor).__name__}")
    check_blocksize(blocksize)
    if tensor.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"quantize_nf4 supports {SUPPORTED_DTYPES}, got {tensor.dtype}; convert with .float()")
    if tensor.numel() == 0:
        raise ValueError(f"quantize_nf4 got an empty tensor of shape {tuple(tensor.shape)}")
    flat = tensor.detach().reshape(-1).float()  # (n,) float32, as bitsandbytes upcasts first

    scaled, absmax = blockwise_absmax_scale(flat, blocksize)  # (n,), (n_blocks,)
    if not torch.isfinite(absmax).all():  # a NaN or Inf anywhere shows up in its block's absmax
        raise ValueError(f"quantize_nf4: tensor of shape {tuple(tensor.shape)} contains NaN or Inf")
    packed = pack_nibbles(nearest_code(scaled, NF4_CODE))  # ((n + 1) // 2, 1)
    if not double_quant:
        return NF4Tensor(packed, absmax, tensor.shape, tensor.dtype, blocksize)
    codes, nested_absmax, offset = quantize_absmax_8bit(absmax)
    return NF4Tensor(packed, codes, tensor.shape, tensor.dtype, blocksize,
                     nested_absmax=nested_absmax, offset=offset)


# --------------------------------------------------------------------------------------------------
# Dequantize
# --------------------------------------------------------------------------------------------------


# A byte holds two codes, so one lookup in this (256, 2) table decodes both:
# BYTE_TO_VALUES[b] = (NF4_CODE[b >> 4], NF4_CODE[b & 15]). One pass instead of unpack, then gather.
BYTE_TO_VALUES = torch.stack([NF4_CODE.repeat_interleave(16), NF4_CODE.repeat(16)], dim=1)  # (256, 2)
# The same table with each row's two float32 values seen as one 8-byte integer: gathering 8-byte scalars is
# about 4x faster on a CPU than gathering 2-element rows (index_select over dim 0 of a (256, 2) tensor), and
# viewing the result back as float32 gives the identical bits. 256 x 8 bytes = 2 KiB: it stays in the L1 cache.
BYTE_TO_PAIR_BITS = BYTE_TO_VALUES.view(torch.int64).reshape(256)  # (256,) int64

# Weights per step of the CPU loop: each step costs a dozen torch calls (~1 us each) of fixed overhead, so fewer,
# larger steps win. The chunk sizes' rows in benchmarks/results/nf4_cpu.md (4096x4096): with one thread 2^18 takes
# 18% (float32) to 29% (bfloat16) less time than 2^15; with two threads the rows are noisy and 2^18 is within 10% of
# 2^15 either way. 2^19 and 2^20 gain another 5-20% in some rows, but their buffers grow past L2 (at 2^18 already
# 512 KiB of int32 indices and 1 MiB of float32 staging). With several threads, mul_ and copy_ over a step this size
# run under OpenMP; index_select over one dimension is a serial loop whatever the thread count.
CPU_CHUNK_VALUES = 1 << 18


def dequantize(q: NF4Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """NF4Tensor -> dense tensor of q.shape: NF4_CODE[index] * block_scale in float32, then cast to dtype."""
    dtype = dtype or q.dtype
    if q.device.type == "cpu":
        return dequantize_cpu(q, dtype)
    n, blocksize = q.numel(), q.blocksize
    table = BYTE_TO_PAIR_BITS.to(q.device)
    pairs = table.index_select(0, q.packed.reshape(-1).int())  # (n_bytes,) int64: two float32 codes each
    values = pairs.view(torch.float32)  # (2 * n_bytes,) float32 in [-1, 1], high nibble first
    scales = q.block_scales()  # (n_blocks,)
    n_full = n // blocksize
    # The product is computed in float32 either way; writing it straight into a 16-bit `out` rounds it as
    # .to(dtype) would, in the same pass (one read and one write of the weight instead of two).
    out = values if dtype == torch.float32 else torch.empty(n, dtype=dtype, device=values.device)  # (n,)
    torch.mul(values[: n_full * blocksize].view(n_full, blocksize), scales[:n_full, None],
              out=out[: n_full * blocksize].view(n_full, blocksize))  # full blocks
    if n_full * blocksize < n:
        torch.mul(values[n_full * blocksize: n], scales[n_full], out=out[n_full * blocksize: n])  # the last block
    return out[:n].view(q.shape)


def dequantize_cpu(q: NF4Tensor, dtype: torch.dtype, chunk_values: int = CPU_CHUNK_VALUES) -> torch.Tensor:
    """The same values as `dequantize`, computed on the CPU in chunks, into an output on huge pages.

    On a CPU, dequantizing is bound by memory traffic and fixed costs, not arithmetic. Done in whole-tensor
    passes (int32 indices, int64 pairs, float32 product, cast), every pass writes a fresh tensor several
    times the size of the weight. Here each chunk of `chunk_values` weights (whole blocks) goes through
    the steps in reused buffers, and the output is written once:

        packed bytes --copy--> int32 indices --index_select in BYTE_TO_PAIR_BITS--> 2 float32 codes per byte
                     --mul_ by the block scales (float32)--> [copy_ into a 16-bit output, which rounds]

    For float32 the code pairs are gathered straight into the output and scaled there; for other dtypes
    into a float32 staging buffer, scaled, then copied (rounding each product once, as bitsandbytes does
    with its float32 product; a table of 16-bit codes would round twice). The products are the float32
    products of `dequantize`, so the result is bit-identical to it (and to bitsandbytes).

    The output comes from `empty_on_huge_pages`: writing a fresh 64 MiB tensor on 4 KiB pages costs
    16,384 page faults, more than the decoding itself (see minift/quant/huge_pages.py).
    """
    n, blocksize = q.numel(), q.blocksize
    chunk = max(chunk_values // blocksize, 1) * blocksize  # whole blocks; every blocksize is even: whole bytes
    flat = q.packed.reshape(-1)  # (n_bytes,) uint8
    n_values = 2 * flat.numel()  # n, plus one padding value (code 0.0) when n is odd
    scales = q.block_scales()[:, None]  # (n_blocks, 1) float32
    full_values = n // blocksize * blocksize  # the values in full blocks
    out = empty_on_huge_pages(n_values, dtype)  # (n_values,)
    indices = torch.empty(min(chunk, n_values) // 2, dtype=torch.int32)  # reused by every chunk
    staging = None if dtype == torch.float32 else torch.empty(indices.numel(), dtype=torch.int64)

    def decode(start: int, stop: int, block_scales: torch.Tensor) -> None:
        """out[start:stop] (an even count, whole blocks but for the last) from its bytes and (rows, 1) scales."""
        count = (stop - start) // 2  # bytes
        target = out[start:stop]
        pairs = target.view(torch.int64) if staging is None else staging[:count]  # (count,) 8-byte pairs
        torch.index_select(BYTE_TO_PAIR_BITS, 0, indices[:count].copy_(flat[start // 2: stop // 2]), out=pairs)
        values = pairs.view(torch.float32)  # (stop - start,) codes
        values.view(block_scales.shape[0], -1).mul_(block_scales)  # each row (a block) times its scale
        if staging is not None:
            target.copy_(values)  # float32 -> dtype, rounding each product once

    for start in range(0, full_values, chunk):
        stop = min(start + chunk, full_values)
        decode(start, stop, scales[start // blocksize: stop // blocksize])
    if full_values < n_values:  # the partial last block, and the padding value when n is odd
        decode(full_values, n_values, scales[-1:])
    return out[:n].view(q.shape)


def nf4_nbytes(numel: int, blocksize: int = 64, double_quant: bool = True, nested_blocksize: int = 256) -> int:
    """Bytes an NF4Tensor of `numel` elements stores (the same count as NF4Tensor.nbytes)."""
    n_blocks = -(-numel // blocksize)
    codes = (numel + 1) // 2
    if not double_quant:
        return codes + 4 * n_blocks
    return codes + n_blocks + 4 * -(-n_blocks // nested_blocksize) + 4


# ----------------------------------------------------------------------------------------------------
# Under torch.compile
# ----------------------------------------------------------------------------------------------------

# Two functions must run as written even inside compiled code: lut_code, because a compiler could fuse its index
# arithmetic and round differently from bitsandbytes, and dequantize_cpu, whose chunk loop would unroll into one op
# per chunk if traced. torch.compiler.disable does that, but applying it imports torch._dynamo (about 1.4 s, and
# Triton with it) - at import time that would slow every minift command, so it is applied when compiling starts.
_EAGER_UNDER_COMPILE = ("lut_code", "dequantize_cpu")


def keep_out_of_compile() -> None:
    """Make lut_code and dequantize_cpu run eagerly inside torch.compile'd code (idempotent).

    minift.train.compiled calls it before compiling; call it yourself before torch.compile of a model with NF4
    layers. The module's own callers look these names up at call time, so replacing them here is enough.
    """
    for name in _EAGER_UNDER_COMPILE:
        fn = globals()[name]
        if not getattr(fn, "_minift_eager", False):
            eager = torch.compiler.disable(fn)
            eager._minift_eager = True
            globals()[name] = eager

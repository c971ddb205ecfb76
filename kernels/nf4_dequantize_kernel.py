"""NF4 dequantization in Triton: packed 4-bit codes + double-quantized scales -> bf16/fp16/fp32.

Lesson
------
Motivation. A QLoRA model keeps its frozen weights as NF4 (minift/quant/nf4.py): two 4-bit code indices
per byte plus one scale per block of 64 weights, the scales themselves quantized to 8 bits ("double
quantization"). Before a weight can meet an activation it has to be turned back into numbers with the two
code tables NF4_CODE and DYNAMIC_MAP (nf4_codes.py, beside this file):

    element j of the flattened weight (n elements, blocks of BLOCKSIZE, nested blocks of 256):
        byte  = packed[j // 2]                         uint8
        code  = byte >> 4  if j is even else byte & 15 4-bit index into the 16 NF4 values
        b     = j // BLOCKSIZE                         which quantization block
        scale = DYNAMIC_MAP[absmax[b]] * nested_absmax[b // 256] + offset    (absmax[b] without double quant)
        w[j]  = NF4_CODE[code] * scale                 float32 product, then cast to the output dtype

Dequantization is pure data movement: per weight it reads half a byte (plus 1/64 of a byte of scale)
and writes 2 bytes of bf16. On a GPU the only thing that matters is touching each byte once.

The naive reference (`nf4_dequantize_reference`, below) writes the formula with whole-tensor torch ops.
It is the spec and the CPU fallback, but every intermediate is a full-size tensor in memory:

    unpack nibbles   reads 0.5 B/weight, writes an int64 index per weight        ~ 8.5 B/weight
    NF4_CODE[codes]  reads the indices, writes float32 values                    ~ 12  B/weight
    expand scales    repeat_interleave writes one float32 scale per weight       ~ 4   B/weight
    values * scales  reads both, writes float32                                  ~ 12  B/weight
    cast to bf16     reads float32, writes bf16                                  ~ 6   B/weight
                                                                          total ~ 40+ B/weight

The kernel below does the same arithmetic in registers and moves 0.5 + 2 = 2.5 bytes per bf16 weight:
about 16x less traffic, i.e. about 16x faster on a bandwidth-bound GPU.

Kernel layout. One program handles BLOCKS_PER_PROGRAM whole quantization blocks, as a 2-D tile:

             BLOCKSIZE // 2 bytes                            BLOCKSIZE elements
    block b   [ab][cd][ef] ...     --unpack-->  block b   [a][b][c][d][e][f] ... x scale[b]
    block b+1 [..][..][..] ...                  block b+1 [.][.][.][.][.][.] ... x scale[b+1]

so each scale is computed once per row of the tile (one uint8 load, two table look-ups) and broadcast,
the packed bytes are read as one contiguous vector per row, and the output row is one contiguous store.
The two nibbles of a byte are decoded separately and interleaved back with `tl.join` + `reshape`
(high nibble first, which is element 2i).

The helpers `nf4_decode_nibbles`, `nf4_block_scale` and `nf4_decode_tile` are @triton.jit functions
shared with the matmul kernels (nf4_matmul_kernel.py, nf4_gemv_kernel.py, nf4_matmul_backward_kernel.py),
so every kernel decodes the format the same way.

Discussion
----------
* Bit-exactness. The kernel computes `DYNAMIC_MAP[code] * nested + offset` and `value * scale` in
  float32 exactly like the reference. A GPU compiler would normally contract `a * b + c` into one fused
  multiply-add (one rounding instead of two), which can move the last bit of a scale; we launch with
  `enable_fp_fusion=False` so the kernel matches the reference bit for bit (free: this kernel is bound
  by memory, not arithmetic).
* Look-ups. NF4_CODE (64 bytes) and DYNAMIC_MAP (1 KiB) are gathered from global memory; after the
  first touch they live in L1, so a gather costs an L1 hit, not a DRAM read.
* 64-bit indices. Element indices are computed in int64 so tensors above 2^31 elements stay correct.
* Under Triton's interpreter (the CPU tests) a float32 -> bfloat16 cast truncates instead of rounding to
  nearest even as the compiled kernel and torch do; the tests expect exactly that, so they still check
  every bit.
* What it does not do: fuse into the consumer. Dequantizing a 4096 x 4096 layer writes 33.5 MB that the
  next matmul reads back; nf4_matmul_kernel.py removes that round trip by dequantizing inside the GEMM.
"""

from __future__ import annotations

import torch

from .nf4_codes import DYNAMIC_MAP, NF4_CODE
from .triton_support import is_interpreted, tile_configs, tl, triton, use_triton

# --------------------------------------------------------------------------------------------------
# The reference: the spec, in whole-tensor torch ops (and the CPU fallback)
# --------------------------------------------------------------------------------------------------


def nf4_dequantize_reference(q, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dequantize NF4Tensor `q` with plain torch ops; float32 arithmetic (float64 if dtype is float64).

    Written out independently of `NF4Tensor.dequantize` (tests check both agree bit for bit).
    """
    dtype = dtype or q.dtype
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    device, n = q.packed.device, q.numel()
    packed = q.packed.reshape(-1)  # (ceil(n/2),) uint8        reads n/2 bytes
    codes = torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(-1)[:n].long()  # (n,)  writes 8n bytes
    values = NF4_CODE.to(device, compute)[codes]  # (n,) in [-1, 1]                       writes 4n bytes
    if q.double_quant:
        absmax_codes = q.absmax.long()  # (n_blocks,)
        nested = q.nested_absmax.to(compute).repeat_interleave(q.nested_blocksize)[: q.n_blocks]  # (n_blocks,)
        scales = DYNAMIC_MAP.to(device, compute)[absmax_codes] * nested + q.offset.to(compute)  # (n_blocks,)
    else:
        scales = q.absmax.to(compute)  # (n_blocks,)
    per_element = scales.repeat_interleave(q.blocksize)[:n]  # (n,)                      writes 4n bytes
    return (values * per_element).reshape(q.shape).to(dtype)  # (*shape,)               4n + cast


# --------------------------------------------------------------------------------------------------
# Shared pieces: code tables on each device, launch arguments, and the @triton.jit decoding helpers
# --------------------------------------------------------------------------------------------------

_TABLES: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def code_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(NF4_CODE (16,), DYNAMIC_MAP (256,)) float32 on `device`, copied there once and cached."""
    device = torch.device(device)
    if device not in _TABLES:
        _TABLES[device] = (NF4_CODE.to(device), DYNAMIC_MAP.to(device))
    return _TABLES[device]


def quant_state_arguments(q, device: torch.device) -> dict:
    """Kernel arguments describing q's scales; tensors a kernel ignores are replaced by a valid pointer."""
    nf4_code, dynamic_map = code_tables(device)
    return dict(
        absmax_ptr=q.absmax,
        nested_absmax_ptr=q.nested_absmax if q.double_quant else q.absmax,  # unused without double quant
        offset_ptr=q.offset.reshape(1) if q.double_quant else q.absmax,  # a pointer, never .item() (no sync)
        code_ptr=nf4_code,
        dynamic_map_ptr=dynamic_map,
        BLOCKSIZE=q.blocksize,
        NESTED_BLOCKSIZE=q.nested_blocksize,
        DOUBLE_QUANT=q.double_quant,
    )


def fused_path_supported(q) -> bool:
    """The fused kernels need a 2-D weight whose rows are whole quantization blocks."""
    return len(q.shape) == 2 and q.shape[1] % q.blocksize == 0


def dot_arguments(dtype: torch.dtype, kernel) -> dict:
    """DOT_DTYPE / DOT_PRECISION for the tl.dot of the matmul kernels on operands of `dtype`.

    fp32 operands use IEEE fp32 unless torch.backends.cuda.matmul.allow_tf32 (torch.matmul's rule).
    Under the interpreter, bf16 operands are upcast to fp32 first (exact; see nf4_matmul_kernel.py, Discussion).
    """
    interpreted_bf16 = is_interpreted(kernel) and dtype == torch.bfloat16
    precision = "tf32" if dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32 else "ieee"
    dot_dtype = tl.float32 if interpreted_bf16 else {torch.float32: tl.float32, torch.float16: tl.float16,
                                                       torch.bfloat16: tl.bfloat16}[dtype]
    return dict(DOT_DTYPE=dot_dtype, DOT_PRECISION=precision)


@triton.jit
def nf4_decode_nibbles(packed_bytes, code_ptr):
    """uint8 tile -> (values of the high nibbles, values of the low nibbles), float32 in [-1, 1]."""
    packed_bytes = packed_bytes.to(tl.int32)
    high = tl.load(code_ptr + (packed_bytes >> 4))  # element 2i: NF4_CODE gather, an L1 hit
    low = tl.load(code_ptr + (packed_bytes & 0x0F))  # element 2i + 1
    return high, low


@triton.jit
def nf4_block_scale(absmax_ptr, nested_absmax_ptr, offset_ptr, dynamic_map_ptr, block, mask,
                    DOUBLE_QUANT: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr):
    """float32 scale of each quantization block in `block` (any shape of int indices)."""
    if DOUBLE_QUANT:
        absmax_code = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)  # uint8 -> 0..255
        nested = tl.load(nested_absmax_ptr + block // NESTED_BLOCKSIZE, mask=mask, other=0.0)  # float32
        scale = tl.load(dynamic_map_ptr + absmax_code) * nested + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)  # float32 absmax
    return scale


@triton.jit
def nf4_decode_tile(packed_bytes, first_block, k, row_valid, code_ptr, absmax_ptr, nested_absmax_ptr, offset_ptr,
                    dynamic_map_ptr, ROWS: tl.constexpr, COLS: tl.constexpr, BLOCKSIZE: tl.constexpr,
                    NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr):
    """Packed bytes (ROWS, COLS/2) of W[rows, k:k+COLS] -> float32 weights (ROWS, COLS), element order.

    first_block (ROWS,): the quantization block of W[row, 0]. Requires K % BLOCKSIZE == 0 (a row of W is
    made of whole blocks), COLS a power of two and k a multiple of COLS, so the COLS columns either sit
    inside one block or span COLS / BLOCKSIZE whole blocks.
    """
    SUB: tl.constexpr = min(COLS, BLOCKSIZE)  # columns that share one scale
    GROUPS: tl.constexpr = COLS // SUB  # scales per row of the tile (1 when COLS <= BLOCKSIZE)
    block = first_block[:, None] + ((k + tl.arange(0, GROUPS) * SUB) // BLOCKSIZE)[None, :]  # (ROWS, GROUPS)
    scale = nf4_block_scale(absmax_ptr, nested_absmax_ptr, offset_ptr, dynamic_map_ptr, block, row_valid[:, None],
                            DOUBLE_QUANT, NESTED_BLOCKSIZE)  # (ROWS, GROUPS) float32
    high, low = nf4_decode_nibbles(packed_bytes, code_ptr)  # (ROWS, COLS/2) each: elements 2i and 2i+1
    values = tl.reshape(tl.join(high, low), (ROWS, GROUPS, SUB))  # interleave back to element order
    return tl.reshape(values * scale[:, :, None], (ROWS, COLS))  # same float32 rounding as the reference


# --------------------------------------------------------------------------------------------------
# The kernel
# --------------------------------------------------------------------------------------------------


@triton.jit
def _nf4_dequantize_kernel(
    packed_ptr, absmax_ptr, nested_absmax_ptr, offset_ptr, code_ptr, dynamic_map_ptr, out_ptr,
    n_elements, n_blocks,
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
    BLOCKS_PER_PROGRAM: tl.constexpr,
):
    HALF: tl.constexpr = BLOCKSIZE // 2  # bytes per quantization block
    # Which quantization blocks this program owns: one row of the tile per block.
    block = tl.program_id(0) * BLOCKS_PER_PROGRAM + tl.arange(0, BLOCKS_PER_PROGRAM)  # (R,)
    block_valid = block < n_blocks  # (R,)
    # One scale per row: a uint8 load and two table look-ups, or one float32 load.
    scale = nf4_block_scale(absmax_ptr, nested_absmax_ptr, offset_ptr, dynamic_map_ptr, block, block_valid,
                            DOUBLE_QUANT, NESTED_BLOCKSIZE)  # (R,) float32
    # The packed bytes of those blocks: each row is one contiguous run of BLOCKSIZE // 2 bytes.
    byte_index = block[:, None].to(tl.int64) * HALF + tl.arange(0, HALF)[None, :]  # (R, HALF) int64
    byte_valid = byte_index < (n_elements + 1) // 2  # (R, HALF): the last block may be partial
    packed_bytes = tl.load(packed_ptr + byte_index, mask=byte_valid, other=0)  # (R, HALF) uint8
    high, low = nf4_decode_nibbles(packed_bytes, code_ptr)  # (R, HALF) float32 each
    # Interleave back to element order (high nibble = element 2i) and apply the block scale.
    values = tl.reshape(tl.join(high, low), (BLOCKS_PER_PROGRAM, BLOCKSIZE))  # (R, BLOCKSIZE)
    values = values * scale[:, None]  # (R, BLOCKSIZE) float32, same rounding as the reference
    element = block[:, None].to(tl.int64) * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]  # (R, BLOCKSIZE)
    tl.store(out_ptr + element, values.to(out_ptr.dtype.element_ty), mask=element < n_elements)


# --------------------------------------------------------------------------------------------------
# The launcher
# --------------------------------------------------------------------------------------------------

OUTPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ELEMENTS_PER_PROGRAM = 4096  # compiled: 4096 weights = 2 KiB in, 8 KiB of bf16 out per program
ELEMENTS_PER_PROGRAM_INTERPRETED = 65536  # the interpreter pays per program, so give it big tiles


def check_nf4_tensor(q, name: str = "q") -> None:
    """Clear errors for things that are not an NF4Tensor the kernels can read."""
    for field in ("packed", "absmax", "shape", "blocksize", "nested_absmax", "offset"):
        if not hasattr(q, field):
            raise TypeError(f"{name} must be a minift.quant.NF4Tensor (quantize_nf4(weight)); "
                            f"got {type(q).__name__} without '{field}'")
    tensors = {"packed": q.packed, "absmax": q.absmax, "nested_absmax": q.nested_absmax, "offset": q.offset}
    devices = {t.device for t in tensors.values() if t is not None}
    if len(devices) > 1:
        raise ValueError(f"{name}: NF4Tensor fields are on different devices {sorted(map(str, devices))}; "
                         f"move it with {name}.to(device)")
    if not q.packed.is_contiguous() or not q.absmax.is_contiguous():
        raise ValueError(f"{name}: NF4Tensor.packed and .absmax must be contiguous")


def nf4_dequantize(q, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dequantize NF4Tensor `q` to a dense tensor of q.shape and `dtype` (default: q.dtype).

    Runs the Triton kernel when q lives on a GPU (or under TRITON_INTERPRET=1), else the reference.
    """
    check_nf4_tensor(q)
    dtype = dtype or q.dtype
    if dtype not in OUTPUT_DTYPES:
        raise ValueError(f"nf4_dequantize: dtype must be one of {OUTPUT_DTYPES}, got {dtype}")
    if not use_triton(_nf4_dequantize_kernel, q.packed):
        return nf4_dequantize_reference(q, dtype)
    device = q.packed.device
    out = torch.empty(q.shape, dtype=dtype, device=device)  # (*shape,)
    elements = ELEMENTS_PER_PROGRAM_INTERPRETED if is_interpreted(_nf4_dequantize_kernel) else ELEMENTS_PER_PROGRAM
    blocks_per_program = max(1, elements // q.blocksize)
    grid = (triton.cdiv(q.n_blocks, blocks_per_program),)
    _nf4_dequantize_kernel[grid](
        packed_ptr=q.packed, out_ptr=out, n_elements=q.numel(), n_blocks=q.n_blocks,
        BLOCKS_PER_PROGRAM=blocks_per_program, **quant_state_arguments(q, device),
        num_warps=4, enable_fp_fusion=False,
    )
    return out


# --------------------------------------------------------------------------------------------------
# Ahead-of-time compile cases (kernels/aot.py compiles them for sm_80 and sm_90 without a GPU)
# --------------------------------------------------------------------------------------------------

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # minift.quant.nf4.VALID_BLOCKSIZES (a test checks)


def quant_state_aot_constants(blocksize: int = 64, double_quant: bool = True) -> tuple[dict, dict]:
    """(pointer types, constexprs) of the quant-state arguments, as quant_state_arguments passes them."""
    pointers = dict(absmax_ptr="*u8" if double_quant else "*fp32", nested_absmax_ptr="*fp32",
                    offset_ptr="*fp32", code_ptr="*fp32", dynamic_map_ptr="*fp32")
    return pointers, dict(BLOCKSIZE=blocksize, NESTED_BLOCKSIZE=256, DOUBLE_QUANT=double_quant)


def matmul_aot_cases(module: str, kernel: str, tiles: list, order: tuple, activation: str, output: str,
                     has_bias: bool | None) -> list:
    """Compile cases of a fused NF4 GEMM-shaped kernel (this one and the backward): every tile in `tiles` x
    {bf16, fp16, fp32 with IEEE dot (the default), fp32 with TF32 dot (allow_tf32)} at blocksize 64, double
    quantization (and bias); every tile again at blocksize 32 in bf16; blocksize 128 and 4096, no double
    quantization (and no bias) on the first tile."""
    from .aot import DTYPE_NAMES, CompileCase, config_label, pointer_type

    configs = tile_configs(tiles, order)
    dot = {torch.bfloat16: "tl.bfloat16", torch.float16: "tl.float16", torch.float32: "tl.float32"}

    def case(config, dtype, precision="tf32", blocksize=64, double_quant=True, bias=has_bias, variant="default"):
        pointers, constants = quant_state_aot_constants(blocksize, double_quant)
        pointers.update({activation: pointer_type(dtype), "packed_ptr": "*u8", output: pointer_type(dtype)})
        if has_bias is not None:
            pointers["bias_ptr"] = pointer_type(dtype)
            constants["HAS_BIAS"] = bias
        return CompileCase(
            module=module, kernel=kernel, dtype=DTYPE_NAMES[str(dtype)] + ("-tf32" if dtype == torch.float32
                                                                            and precision == "tf32" else ""),
            config=config_label(config.kwargs, config.num_warps, config.num_stages), pointers=pointers,
            constexprs=dict(constants, DOT_DTYPE=dot[dtype], DOT_PRECISION=precision, **config.kwargs),
            num_warps=config.num_warps, num_stages=config.num_stages, enable_fp_fusion=False, variant=variant)

    dtypes = [(torch.bfloat16, "tf32"), (torch.float16, "tf32"), (torch.float32, "ieee"), (torch.float32, "tf32")]
    cases = [case(config, dtype, precision) for config in configs for dtype, precision in dtypes]
    cases += [case(config, torch.bfloat16, blocksize=32, variant="blocksize 32") for config in configs]
    cases += [case(configs[0], torch.bfloat16, blocksize=bs, variant=f"blocksize {bs}") for bs in (128, 4096)]
    cases += [case(configs[0], torch.bfloat16, double_quant=False, variant="no double quant")]
    if has_bias is not None:
        cases += [case(configs[0], torch.bfloat16, bias=False, variant="no bias")]
    return cases


def aot_cases() -> list:
    """The specializations nf4_dequantize launches on a GPU: each output dtype with and without double
    quantization at blocksize 64, and every other blocksize in bf16 (num_warps 4, ELEMENTS_PER_PROGRAM)."""
    from .aot import CompileCase, DTYPE_NAMES, pointer_type

    variants = [(dtype, 64, dq, "default" if dq else "no double quant") for dtype in OUTPUT_DTYPES
                for dq in (True, False)]
    variants += [(torch.bfloat16, bs, True, f"blocksize {bs}") for bs in BLOCKSIZES if bs != 64]
    cases = []
    for dtype, blocksize, double_quant, variant in variants:
        pointers, constants = quant_state_aot_constants(blocksize, double_quant)
        per_program = max(1, ELEMENTS_PER_PROGRAM // blocksize)
        cases.append(CompileCase(
            module="nf4_dequantize_kernel", kernel="_nf4_dequantize_kernel",
            config=f"BLOCKS_PER_PROGRAM={per_program} w4", dtype=DTYPE_NAMES[str(dtype)],
            pointers=dict(pointers, packed_ptr="*u8", out_ptr=pointer_type(dtype)),
            constexprs=dict(constants, BLOCKS_PER_PROGRAM=per_program), num_warps=4, num_stages=3,
            enable_fp_fusion=False, unaligned=(), variant=variant))
    return cases

"""NF4 Triton kernels (kernels/nf4_*_kernel.py) against their pure-torch references and a float64 truth.

Without a GPU the kernels run in Triton's interpreter (numpy, on the CPU): TRITON_INTERPRET=1 is set
before the kernel modules are imported, because Triton reads it when `@triton.jit` decorates a kernel.
With a GPU the same tests run the compiled kernels on CUDA tensors, plus the `gpu` tests at the bottom.

Tolerances. Every matmul result is compared with the exact product of the same inputs in float64
(x, bias, and W dequantized in float64). With u(dtype) the unit roundoff (fp32 2^-24, fp16 2^-11,
bf16 2^-8), each output element obeys the standard forward error bound of a dot product:

    |y - y_exact| <= (u_W + (R + 8) * u(fp32)) * (|x| @ |W|^T) + u(dtype) * |y_exact|

    u_W          W rounded to x's dtype before the dot (the fused GEMM does this, like dequantize + matmul)
    R * u(fp32)  fp32 accumulation over the R terms of the reduction (K forward, N backward)
    8 * u(fp32)  block scale and weight computed in float32 instead of float64
    u(dtype)     the final rounding of y to x's dtype

The bound is rigorous (no fudge factor), yet a wrong nibble, scale or block index moves whole terms of
|x| @ |W|^T and breaks it by orders of magnitude. Triton's interpreter converts float32 to bfloat16 by
truncation instead of round-to-nearest, so under the interpreter u_W and u(dtype) for bf16 are 2^-7.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of a kernel module

triton = pytest.importorskip("triton")

from minift.quant.nf4 import quantize_nf4  # noqa: E402

# The kernel modules, in dependency order.
KERNEL_MODULES = ["nf4_dequantize_kernel", "nf4_gemv_kernel", "nf4_matmul_backward_kernel", "nf4_matmul_kernel"]


def _import_kernels():
    """Import the kernel modules; re-import them if an earlier test imported them without the interpreter."""
    modules = [importlib.import_module(f"minift.kernels.{name}") for name in KERNEL_MODULES]
    support = importlib.import_module("minift.kernels.triton_support")
    if not ON_GPU and not support.is_interpreted(modules[0]._nf4_dequantize_kernel):
        modules = [importlib.reload(module) for module in modules]
    return modules


dequant_module, gemv_module, backward_module, matmul_module = _import_kernels()
from minift.kernels.triton_support import is_interpreted, use_triton  # noqa: E402

INTERPRETED = is_interpreted(dequant_module._nf4_dequantize_kernel)
DEVICE = "cuda" if ON_GPU else "cpu"
FP32_U = 2.0**-24
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11,
                 torch.bfloat16: 2.0**-7 if INTERPRETED else 2.0**-8}


def make_weight(n: int, k: int, blocksize: int, double_quant: bool, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=generator) * 0.02  # (N, K), a typical init scale
    return quantize_nf4(weight, blocksize=blocksize, double_quant=double_quant).to(DEVICE)


def random(*shape, dtype=torch.float32, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator).to(DEVICE, dtype)


def assert_within_dot_bound(result, exact, magnitude, reduction: int, dtype, rounded_weight=True):
    """|result - exact| <= (u_W + (reduction + 8) u32) * magnitude + u(dtype) * |exact| (module docstring)."""
    u = UNIT_ROUNDOFF[dtype]
    u_weight = u if rounded_weight else 0.0
    bound = (u_weight + (reduction + 8) * FP32_U) * magnitude + u * exact.abs()
    error = (result.double() - exact).abs()
    worst = (error / bound).max().item()
    assert worst <= 1.0, f"error reaches {worst:.2f}x the bound (max abs error {error.max().item():.3e})"


def exact_linear(x, q, bias):
    """float64 truth: (y, |x| @ |W|^T) for y = x W^T + b, with W dequantized in float64."""
    weight = dequant_module.nf4_dequantize_reference(q, torch.float64)  # (N, K)
    b = None if bias is None else bias.double()
    return torch.nn.functional.linear(x.double(), weight, b), x.double().abs() @ weight.abs().T


def test_kernels_run_here_not_the_fallback():
    """Guards every test below: on a CPU the interpreter must run the kernels (not the torch fallback)."""
    assert use_triton(dequant_module._nf4_dequantize_kernel, torch.empty(1, device=DEVICE))
    assert use_triton(matmul_module._nf4_matmul_kernel, torch.empty(1, device=DEVICE))


def test_import_minift_kernels_does_not_import_triton():
    code = "import sys, minift.kernels; assert 'triton' not in sys.modules, 'triton imported eagerly'"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "TRITON_INTERPRET": "0"})


# --------------------------------------------------------------------------------------------------
# Dequantize: bit-exact with the reference
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape, blocksize, double_quant", [
    ((576, 1536), 64, True),  # SmolLM2 MLP weight
    ((37, 41), 64, True),  # odd element count: partial last block, padded last byte
    ((192, 320), 128, False),  # K not a multiple of the blocksize: blocks straddle rows
    ((1001,), 32, True),  # 1-D, smallest blocksize
    ((3, 4096), 4096, True),  # largest blocksize
])
def test_dequantize_is_bit_exact(shape, blocksize, double_quant):
    generator = torch.Generator().manual_seed(0)
    q = quantize_nf4(torch.randn(*shape, generator=generator), blocksize, double_quant).to(DEVICE)
    reference32 = dequant_module.nf4_dequantize_reference(q, torch.float32)
    assert torch.equal(reference32, q.dequantize(torch.float32))  # two independent torch implementations agree
    assert torch.equal(dequant_module.nf4_dequantize(q, torch.float32), reference32)
    assert torch.equal(dequant_module.nf4_dequantize(q, torch.float16), reference32.half())
    if INTERPRETED:  # the interpreter truncates float32 -> bfloat16 (module docstring): emulate that exactly
        expected_bf16 = (reference32.view(torch.int32) & -65536).view(torch.float32).bfloat16()
    else:
        expected_bf16 = reference32.bfloat16()
    assert torch.equal(dequant_module.nf4_dequantize(q, torch.bfloat16), expected_bf16)


def test_dequantize_reads_bitsandbytes_data():
    """The kernel decodes bytes and statistics that bitsandbytes itself produced, to bitsandbytes' values."""
    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    from minift.quant.nf4 import DYNAMIC_MAP, NF4_CODE, NF4Tensor

    dtype = torch.bfloat16 if ON_GPU else torch.float32  # bf16 under the interpreter: see the module docstring
    weight = random(192, 576, dtype=dtype)
    packed, state = bnb_functional.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
    assert torch.equal(state.code.cpu(), NF4_CODE) and torch.equal(state.state2.code.cpu(), DYNAMIC_MAP)
    q = NF4Tensor(packed.view(-1, 1), state.absmax, weight.shape, dtype, blocksize=64,
                  nested_absmax=state.state2.absmax, offset=state.offset)
    expected = bnb_functional.dequantize_4bit(packed, state)  # (192, 576) in dtype
    assert torch.equal(dequant_module.nf4_dequantize(q, dtype), expected)


# --------------------------------------------------------------------------------------------------
# Forward: GEMV (M <= 4), fused GEMM, and the dequantize fallback
# --------------------------------------------------------------------------------------------------

FORWARD_CASES = [
    # (M, N, K, blocksize, double_quant, dtype, bias)
    (1, 576, 1536, 64, True, torch.bfloat16, False),  # SmolLM2 down-projection shape, decoding
    (3, 1536, 576, 64, True, torch.float16, True),  # up-projection, GEMV with 3 rows
    (1, 192, 320, 128, False, torch.float32, True),  # K=320 not a multiple of 128: dequantize fallback
    (17, 576, 1536, 64, True, torch.float32, True),  # fused GEMM, M tile partly masked
    (17, 1536, 576, 64, False, torch.bfloat16, False),
    (64, 192, 320, 64, True, torch.bfloat16, True),
    (64, 576, 1536, 128, True, torch.float16, False),
    (64, 320, 384, 128, False, torch.float32, False),  # N=320: N tile partly masked
    (300, 192, 320, 64, True, torch.bfloat16, True),  # several M tiles
    (2, 64, 512, 256, True, torch.float32, True),  # GEMV: four groups of 64 columns share one scale
]


@pytest.mark.parametrize("M, N, K, blocksize, double_quant, dtype, with_bias", FORWARD_CASES)
def test_matmul_forward_within_bound(M, N, K, blocksize, double_quant, dtype, with_bias):
    q = make_weight(N, K, blocksize, double_quant)
    x = random(M, K, dtype=dtype)  # (M, K)
    bias = random(N, dtype=dtype, seed=2) if with_bias else None
    y = matmul_module.nf4_matmul(x, q, bias)  # (M, N)
    assert y.shape == (M, N) and y.dtype == dtype
    exact, magnitude = exact_linear(x, q, bias)
    gemv = M <= matmul_module.GEMV_MAX_ROWS and K % blocksize == 0  # the GEMV never rounds W to x's dtype
    assert_within_dot_bound(y, exact, magnitude, K, dtype, rounded_weight=not gemv)


def test_matmul_flattens_leading_dimensions_and_matches_reference():
    q = make_weight(192, 320, 64, True)
    x = random(2, 5, 320, dtype=torch.float32)  # (B, T, K) -> M = 10 rows
    y = matmul_module.nf4_matmul(x, q)
    assert y.shape == (2, 5, 192)
    reference = matmul_module.nf4_matmul_reference(x, q)
    torch.testing.assert_close(y, reference, rtol=1e-5, atol=1e-5)  # both fp32: only summation order differs


def test_tiles_narrower_than_a_quantization_block(monkeypatch):
    """BLOCK_K = 32 < blocksize 128 (CUDA configs do this): four K steps share each scale."""
    for module in (matmul_module, backward_module):  # the interpreter's tile width comes from this helper
        monkeypatch.setattr(module, "largest_power_of_2_dividing", lambda n, at_most: 32)
    q = make_weight(96, 384, 128, True)
    x = random(20, 384)  # (M, K), fused GEMM
    exact, magnitude = exact_linear(x, q, None)
    assert_within_dot_bound(matmul_module.nf4_matmul(x, q), exact, magnitude, 384, torch.float32)
    grad_y = random(20, 96, seed=3)
    weight = dequant_module.nf4_dequantize_reference(q, torch.float64)  # (N, K)
    assert_within_dot_bound(backward_module.nf4_matmul_backward_input(grad_y, q), grad_y.double() @ weight,
                            grad_y.double().abs() @ weight.abs(), 96, torch.float32)


def test_package_functions_survive_kernel_imports():
    """minift.kernels.nf4_matmul stays the function after its kernel module is imported."""
    import minift.kernels as kernels

    q = make_weight(64, 128, 64, False)
    x = random(2, 128)
    for _ in range(2):
        assert callable(kernels.nf4_matmul) and callable(kernels.nf4_dequantize)
        assert kernels.nf4_matmul(x, q).shape == (2, 64)
        assert kernels.nf4_dequantize(q).shape == (64, 128)
    assert kernels.NF4MatmulFunction is matmul_module.NF4MatmulFunction


def test_cpu_tensors_use_the_reference_when_kernels_are_compiled():
    """A compiled (not interpreted) kernel never runs on CPU tensors: the torch reference does."""
    compiled_kernel = object()  # anything that is not an InterpretedFunction
    assert not use_triton(compiled_kernel, torch.empty(1))


# --------------------------------------------------------------------------------------------------
# Backward kernel: grad_x = grad_y @ W, the reduction runs along N
# --------------------------------------------------------------------------------------------------

BACKWARD_CASES = [
    # (M, N, K, blocksize, double_quant, dtype)
    (1, 576, 1536, 64, True, torch.float32),
    (17, 1536, 576, 64, True, torch.bfloat16),
    (64, 320, 384, 128, False, torch.float16),  # N=320: N tail masked inside the reduction loop
    (3, 192, 320, 128, True, torch.float32),  # dequantize fallback
]


@pytest.mark.parametrize("M, N, K, blocksize, double_quant, dtype", BACKWARD_CASES)
def test_backward_input_within_bound(M, N, K, blocksize, double_quant, dtype):
    q = make_weight(N, K, blocksize, double_quant)
    grad_y = random(M, N, dtype=dtype)  # (M, N)
    grad_x = backward_module.nf4_matmul_backward_input(grad_y, q)  # (M, K)
    assert grad_x.shape == (M, K) and grad_x.dtype == dtype
    weight = dequant_module.nf4_dequantize_reference(q, torch.float64)  # (N, K)
    exact, magnitude = grad_y.double() @ weight, grad_y.double().abs() @ weight.abs()
    assert_within_dot_bound(grad_x, exact, magnitude, N, dtype)


# --------------------------------------------------------------------------------------------------
# autograd.Function: x and bias gradients against torch autograd through the reference
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("leading, dtype", [((2, 9), torch.float32), ((3,), torch.bfloat16)])
def test_autograd_matches_reference_autograd(leading, dtype):
    N, K = 192, 320
    q = make_weight(N, K, 64, True)
    x = random(*leading, K, dtype=dtype).requires_grad_()  # (..., K)
    bias = random(N, dtype=dtype, seed=2).requires_grad_()  # (N,)
    grad_y = random(*leading, N, dtype=dtype, seed=3)  # (..., N)
    y = matmul_module.nf4_matmul(x, q, bias)
    assert y.grad_fn is not None and type(y.grad_fn).__name__ == "NF4MatmulFunctionBackward"
    y.backward(grad_y)

    x64 = x.detach().double().requires_grad_()
    bias64 = bias.detach().double().requires_grad_()
    weight = dequant_module.nf4_dequantize_reference(q, torch.float64)  # frozen: no grad
    torch.nn.functional.linear(x64, weight, bias64).backward(grad_y.double())

    M = x64.numel() // K
    u = UNIT_ROUNDOFF[dtype]
    assert_within_dot_bound(x.grad, x64.grad, grad_y.double().abs() @ weight.abs(), N, dtype)
    rows = grad_y.double().reshape(M, N)
    bias_bound = M * FP32_U * rows.abs().sum(0) + u * bias64.grad.abs()  # fp32 column sum, then rounding
    assert ((bias.grad.double() - bias64.grad).abs() <= bias_bound).all()


def test_autograd_without_bias_and_frozen_input():
    q = make_weight(192, 320, 64, False)
    x = random(4, 320).requires_grad_()
    y = matmul_module.NF4MatmulFunction.apply(x, q, None)
    y.sum().backward()
    expected = backward_module.nf4_matmul_backward_input_reference(torch.ones(4, 192, device=DEVICE), q)
    torch.testing.assert_close(x.grad, expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # no graph when nothing needs a gradient
        assert matmul_module.nf4_matmul(x, q).grad_fn is None


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    q = make_weight(192, 320, 64, True)
    with pytest.raises(ValueError, match=r"\(\.\.\., 320\)"):
        matmul_module.nf4_matmul(random(3, 321), q)
    with pytest.raises(ValueError, match=r"bias must have shape \(192,\)"):
        matmul_module.nf4_matmul(random(3, 320), q, random(191))
    with pytest.raises(ValueError, match="x must be one of"):
        matmul_module.nf4_matmul(random(3, 320).double(), q)
    with pytest.raises(TypeError, match="NF4Tensor"):
        matmul_module.nf4_matmul(random(3, 320), random(192, 320))
    with pytest.raises(ValueError, match=r"grad_y must have shape \(\.\.\., 192\)"):
        backward_module.nf4_matmul_backward_input(random(3, 320), q)
    with pytest.raises(ValueError, match="dtype must be one of"):
        dequant_module.nf4_dequantize(q, torch.int8)


# --------------------------------------------------------------------------------------------------
# GPU only: compiled kernels on real layer shapes, autotuning, and bitsandbytes parity
# --------------------------------------------------------------------------------------------------

gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("M", [1, 16, 256])
@pytest.mark.parametrize("N, K", [(4096, 4096), (11008, 4096), (4096, 11008)])
def test_gpu_llama_shapes_within_bound(M, N, K):
    q = make_weight(N, K, 64, True)
    x = random(M, K, dtype=torch.bfloat16)
    bias = random(N, dtype=torch.bfloat16, seed=2)
    y = matmul_module.nf4_matmul(x, q, bias)
    exact, magnitude = exact_linear(x, q, bias)
    assert_within_dot_bound(y, exact, magnitude, K, torch.bfloat16,
                            rounded_weight=M > matmul_module.GEMV_MAX_ROWS)
    grad_x = backward_module.nf4_matmul_backward_input(random(M, N, dtype=torch.bfloat16, seed=3), q)
    assert grad_x.shape == (M, K) and torch.isfinite(grad_x).all()



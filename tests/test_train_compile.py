"""train.compile = true (minift/train/compiled.py): the compiled blocks train like the plain ones.

torch.compile on a CPU generates and builds C++: the first forward + backward of the tiny 2-block decoder
costs ~10-25 s (measured on the shared 2-core machine), so everything is checked in one test that compiles
once. Compiled kernels reorder floating-point sums, so losses and gradients are compared to rounding.
"""

import json

import torch

from minift.train import accumulate_gradients, fit, setup
from minift.train.compiled import compile_seconds
from tests.train_helpers import SENTENCES, run_config, save_tiny_decoder, write_jsonl
from tests.train_helpers import single_thread  # noqa: F401  (autouse fixture: one torch thread)


def gradients(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_compiled_blocks_give_the_plain_losses_and_gradients(tmp_path):
    model_dir = save_tiny_decoder(tmp_path / "model")
    data = write_jsonl(tmp_path / "text.jsonl", [{"text": s} for s in SENTENCES])
    settings = ["train.max_steps=2", "train.save_checkpoints=false", "train.export=false"]
    plain = setup(run_config(model_dir, data, tmp_path / "plain", *settings))
    compiled = setup(run_config(model_dir, data, tmp_path / "compiled", "train.compile=true", *settings))
    # compiled in place: the same parameter names (so checkpoints and exports are unchanged)
    assert [n for n, _ in compiled.model.named_parameters()] == [n for n, _ in plain.model.named_parameters()]
    assert all(hasattr(block, "_compiled_call_impl") and block._compiled_call_impl is not None
               for block in compiled.model.backbone.blocks)

    batches = plain.train_stream.take(0, 1)
    before = compile_seconds()
    expected = accumulate_gradients(plain.model, batches)
    got = accumulate_gradients(compiled.model, batches)
    assert compile_seconds() > before  # it really compiled (forward and backward graphs)
    assert abs(got["loss"] - expected["loss"]) <= 1e-5 * abs(expected["loss"])
    plain_grads = gradients(plain.model)
    compiled_grads = gradients(compiled.model)
    assert compiled_grads.keys() == plain_grads.keys() and plain_grads
    for name, grad in compiled_grads.items():
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-4, atol=1e-6, msg=name)

    for run in (plain, compiled):  # then two real steps each, from the same start
        run.model.zero_grad(set_to_none=True)
    fit(plain), fit(compiled)
    lines = [json.loads(line) for line in (tmp_path / "compiled" / "metrics.jsonl").read_text().splitlines()]
    plain_lines = [json.loads(line) for line in (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2] and all("compile_s" not in line for line in plain_lines)
    assert all(line["compile_s"] >= 0 and line["tokens_per_s"] > 0 for line in lines)  # compiling logged apart
    for ours, theirs in zip(lines, plain_lines):
        assert abs(ours["loss"] - theirs["loss"]) <= 1e-4 * theirs["loss"], (ours, theirs)

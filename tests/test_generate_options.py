"""Generation options: each value outside its range is one clear error, each edge value has a documented meaning.

The ranges (documented in Transformer.generate and `minift generate --help`), checked in `model.generate`
and, with the flags' spelling, in `minift generate` before the model is loaded:

    option           allowed        edge meaning                          transformers
    max_new_tokens   int >= 0       0: the prompt comes back unchanged    rejects 0
    temperature      finite >= 0    0: greedy                             do_sample=False; rejects <= 0 when sampling
    top_k            int >= 0       0 (or None): off                      0 = off, < 0 rejected
    top_p            0 < p <= 1     1 (or None): off                      1 = off, outside [0, 1] rejected
    prompt           >= 1 token     (none: an empty prompt is an error)
    length           learned positions: prompt + max_new_tokens <= max_seq_len; RoPE: may run past it
"""

from pathlib import Path

import numpy as np
import pytest
import torch

import minift
from minift.cli import main
from minift.config import ModelConfig
from minift.model import sample_next_token
from tests.train_helpers import SENTENCES, save_tiny_decoder, save_tiny_encoder, tiny_decoder, word_tokenizer
from tests.train_helpers import single_thread  # noqa: F401  (autouse fixture: one torch thread)

PROMPT = "the big cat sat on the"


def tiny_gpt2(vocab_size: int, max_seq_len: int = 16) -> minift.Transformer:
    """A GPT-2-style decoder: learned positions, a table of exactly max_seq_len of them."""
    torch.manual_seed(0)
    config = ModelConfig(model_type="gpt2", vocab_size=vocab_size, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                         max_seq_len=max_seq_len, norm="layer", positions="learned", mlp="gelu",
                         activation="gelu_tanh", qkv_bias=True, out_bias=True, mlp_bias=True, tie_embeddings=True)
    return minift.Transformer(config).eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("generate")
    llama_dir = save_tiny_decoder(root / "llama")
    gpt2_dir = root / "gpt2"
    tokenizer = word_tokenizer(SENTENCES)
    minift.save(tiny_gpt2(tokenizer.vocab_size), tokenizer, gpt2_dir)
    return {"llama": llama_dir, "gpt2": gpt2_dir, "encoder": save_tiny_encoder(root / "encoder")}


def generate_cli(model_dir: Path, *flags: str) -> int:
    return main(["generate", "--model", str(model_dir), *flags])


def one_error_line(capsys) -> str:
    """The command's stderr must be exactly one line, `minift: error: ...`; returns it."""
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("minift: error: "), err
    return lines[0]


# ----------------------------------------------------------------------------------------------------
# model.generate
# ----------------------------------------------------------------------------------------------------

BAD_OPTIONS = [
    ({"max_new_tokens": -1}, r"max_new_tokens must be an integer >= 0 \(0 returns the prompt\), got -1"),
    ({"max_new_tokens": 2.5}, r"max_new_tokens must be an integer >= 0"),
    ({"max_new_tokens": True}, r"max_new_tokens must be an integer >= 0"),
    ({"temperature": -0.5}, r"temperature must be a finite number >= 0 \(0 = greedy\), got -0.5"),
    ({"temperature": float("nan")}, r"temperature must be a finite number >= 0 .*got nan"),
    ({"temperature": float("inf")}, r"temperature must be a finite number >= 0 .*got inf"),
    ({"top_k": -1}, r"top_k must be an integer >= 0 \(0 = off\), got -1"),
    ({"top_k": 2.0}, r"top_k must be an integer >= 0"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\] \(1 = off\), got 0.0"),
    ({"top_p": -0.1}, r"top_p must be in \(0, 1\]"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
    ({"top_p": float("nan")}, r"top_p must be in \(0, 1\]"),
]


@pytest.fixture(scope="module")
def llama():
    return tiny_decoder(50).eval()


@pytest.mark.parametrize("options,message", BAD_OPTIONS, ids=[next(iter(o)) + "=" + repr(next(iter(o.values())))
                                                              for o, _ in BAD_OPTIONS])
def test_generate_rejects_options_out_of_range(llama, options, message):
    kwargs = {"max_new_tokens": 3, "temperature": 1.0, **options}
    with pytest.raises(ValueError, match=message):
        llama.generate(torch.tensor([[1, 2, 3]]), **kwargs)


def test_sample_next_token_checks_the_same_ranges():
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
        sample_next_token(torch.zeros(1, 5), temperature=-1.0)  # was: greedy, silently
    with pytest.raises(ValueError, match="top_k must be an integer >= 0"):
        sample_next_token(torch.zeros(1, 5), temperature=1.0, top_k=-2)


def test_empty_prompt_and_empty_rows_are_errors(llama):
    with pytest.raises(ValueError, match=r"the prompt is empty \(input_ids has shape \(1, 0\)\)"):
        llama.generate(torch.zeros(1, 0, dtype=torch.long), max_new_tokens=3)
    with pytest.raises(ValueError, match=r"at least one real token \(1\) per row"):
        llama.generate(torch.tensor([[1, 2], [0, 0]]), max_new_tokens=3, attention_mask=torch.tensor([[1, 1], [0, 0]]))
    with pytest.raises(ValueError, match=r"input_ids must be a \(batch, tokens\) tensor of token ids, got \(3,\)"):
        llama.generate(torch.tensor([1, 2, 3]), max_new_tokens=3)


def test_zero_new_tokens_returns_the_prompt(llama):
    prompt = torch.tensor([[4, 5, 6]])
    seen = []
    out = llama.generate(prompt, max_new_tokens=0, on_token=seen.append)
    assert torch.equal(out, prompt) and seen == []
    assert llama.generate(prompt, max_new_tokens=np.int64(2)).shape == (1, 5)  # NumPy integers count as integers


def test_off_values_change_nothing(llama):
    """top_k=0 and top_p=1 are 'off' (transformers' meanings): the same draws as not passing them; top_k past the
    vocabulary keeps everything; top_k/top_p at temperature 0 leave greedy decoding as it is (the argmax is kept by
    every filter); a tiny positive temperature is greedy too, not an overflow."""
    prompt = torch.tensor([[4, 5, 6]])

    def draw(**options):
        return llama.generate(prompt, max_new_tokens=8, generator=torch.Generator().manual_seed(1), **options)

    sampled = draw(temperature=1.0)
    assert torch.equal(draw(temperature=1.0, top_k=0), sampled)
    assert torch.equal(draw(temperature=1.0, top_p=1.0), sampled)
    assert torch.equal(draw(temperature=1.0, top_k=10_000), sampled)
    greedy = draw()
    assert torch.equal(draw(top_k=3, top_p=0.2), greedy)
    assert torch.equal(draw(temperature=1e-30), greedy)


def test_learned_positions_bound_prompt_plus_new_tokens():
    model = tiny_gpt2(50, max_seq_len=16)
    prompt = torch.arange(1, 11)[None]  # 10 tokens
    assert model.generate(prompt, max_new_tokens=6).shape == (1, 16)  # exactly fills the 16 positions
    with pytest.raises(ValueError, match=r"a prompt of 10 tokens \+ max_new_tokens=7 needs 17 positions, but this "
                                         r"model has 16 learned positions .*max_new_tokens <= 6"):
        model.generate(prompt, max_new_tokens=7)
    with pytest.raises(ValueError, match=r"a prompt of 20 tokens \+ max_new_tokens=0 needs 20 positions"):
        model.generate(torch.arange(1, 21)[None], max_new_tokens=0)


def test_rope_models_may_generate_past_max_seq_len(llama):
    """Documented choice (as transformers): RoPE has no position table, so max_seq_len is not a hard limit."""
    assert llama.config.positions == "rope" and llama.config.max_seq_len == 256
    prompt = torch.randint(1, 50, (1, 250), generator=torch.Generator().manual_seed(0))
    assert llama.generate(prompt, max_new_tokens=10).shape == (1, 260)


# ----------------------------------------------------------------------------------------------------
# minift generate
# ----------------------------------------------------------------------------------------------------

CLI_ERRORS = [
    (["--prompt", ""], "--prompt is empty"),
    (["--prompt", "   "], "--prompt '   ' encodes to no tokens"),
    (["--prompt", PROMPT, "--max-new-tokens", "-1"], "--max-new-tokens must be an integer >= 0 (0 returns the prompt)"),
    (["--prompt", PROMPT, "--temperature", "-1"], "--temperature must be a finite number >= 0 (0 = greedy), got -1.0"),
    (["--prompt", PROMPT, "--temperature", "nan"], "--temperature must be a finite number >= 0 (0 = greedy), got nan"),
    (["--prompt", PROMPT, "--top-k", "-5"], "--top-k must be an integer >= 0 (0 = off), got -5"),
    (["--prompt", PROMPT, "--top-p", "0"], "--top-p must be in (0, 1] (1 = off), got 0.0"),
    (["--prompt", PROMPT, "--top-p", "1.01"], "--top-p must be in (0, 1] (1 = off), got 1.01"),
    (["--prompt", PROMPT, "--top-p", "nan"], "--top-p must be in (0, 1] (1 = off), got nan"),
]


@pytest.mark.parametrize("flags,message", CLI_ERRORS, ids=[" ".join(f[2:]) or repr(f[1]) for f, _ in CLI_ERRORS])
def test_cli_generate_option_errors_are_one_line(models, capsys, flags, message):
    assert generate_cli(models["llama"], *flags) == 2
    assert message in one_error_line(capsys)


def test_cli_prompt_longer_than_learned_positions(models, capsys):
    # 6 prompt tokens + 11 new = 17 positions; the GPT-2-style model has 16
    assert generate_cli(models["gpt2"], "--prompt", PROMPT, "--max-new-tokens", "11") == 2
    line = one_error_line(capsys)
    assert "--prompt is 6 tokens and --max-new-tokens is 11: 17 positions, but this model has 16" in line
    assert generate_cli(models["gpt2"], "--prompt", PROMPT, "--max-new-tokens", "10") == 0  # 16 fits
    assert capsys.readouterr().err == ""


def test_cli_generate_needs_a_causal_lm(models, capsys):
    assert generate_cli(models["encoder"], "--prompt", "the big cat") == 2
    assert "generate() needs a causal LM" in one_error_line(capsys)


def test_cli_edge_values_have_their_documented_meaning(models, capsys):
    assert generate_cli(models["llama"], "--prompt", PROMPT, "--max-new-tokens", "0") == 0
    assert capsys.readouterr().out == "\n"  # nothing generated
    outputs = []
    for flags in ([], ["--top-k", "0"], ["--top-p", "1"]):
        assert generate_cli(models["llama"], "--prompt", PROMPT, "--max-new-tokens", "6", "--temperature", "1",
                            "--seed", "3", *flags) == 0
        captured = capsys.readouterr()
        assert captured.err == ""
        outputs.append(captured.out)
    assert outputs[0] == outputs[1] == outputs[2] and outputs[0].strip()
    long_prompt = " ".join(SENTENCES * 6)  # 288 words: past the RoPE model's max_seq_len of 256
    assert generate_cli(models["llama"], "--prompt", long_prompt, "--max-new-tokens", "2") == 0
    assert capsys.readouterr().err == ""

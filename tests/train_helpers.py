"""Tiny models, tiny word-level tokenizers and small datasets for the training-engine tests.

Everything here is built in the test process in milliseconds: a 2-layer decoder or encoder of width 32
and a word-level tokenizer trained on the test's own texts.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers, processors, trainers

import minift
from minift.config import ModelConfig
from minift.data import alpaca_prompt
from minift.tokenizer import Tokenizer

DECODER_SPECIALS = ["<unk>", "<eos>"]
ENCODER_SPECIALS = ["[UNK]", "[PAD]", "[CLS]", "[SEP]", "[MASK]"]

ALPACA = [
    {"instruction": "Give the opposite of the word.", "input": "hot", "output": "cold"},
    {"instruction": "Give the opposite of the word.", "input": "up", "output": "down"},
    {"instruction": "Name the capital city of the country.", "input": "France", "output": "Paris"},
    {"instruction": "Name the capital city of the country.", "input": "Japan", "output": "Tokyo"},
    {"instruction": "Write the plural of the noun.", "input": "mouse", "output": "mice"},
    {"instruction": "Say hello in French.", "input": "", "output": "bonjour"},
]
SENTENCES = [f"the {a} {b} sat on the {c} mat" for a in ("big", "small", "red") for b in ("cat", "dog")
             for c in ("blue", "green")]
SENTIMENT = ([{"text": f"i love this {w} so much", "label": "positive"} for w in ("film", "book", "song", "meal")]
             + [{"text": f"i hate this {w} a lot", "label": "negative"} for w in ("film", "book", "song", "meal")])
# The most frequent English words, so that real text (tweets, fortunes) read by a tiny word-level tokenizer is
# not almost all unknown: [UNK] is a special token, never masked in masked-LM, so all-[UNK] text has no targets.
COMMON_WORDS = ("the of and to a in is you that it he was for on are as with his they I at be this have from "
                "or one had by not but what all were we when your can said there use an each which she do how "
                "their if will up other about out many then them these so some her would make like him into time "
                "has look two more go see no way could people my than first been who its now find long down day "
                "did get come made may part life love man never know good just only very me")


def word_tokenizer(texts: list[str], encoder: bool = False) -> Tokenizer:
    """A whitespace/punctuation word-level tokenizer over `texts`. Decoder: pad == eos (no pad token)."""
    specials = ENCODER_SPECIALS if encoder else DECODER_SPECIALS
    inner = HFTokenizer(models.WordLevel(unk_token=specials[0]))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    inner.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=specials, min_frequency=1))
    if encoder:
        cls, sep = inner.token_to_id("[CLS]"), inner.token_to_id("[SEP]")
        inner.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[
            ("[CLS]", cls), ("[SEP]", sep)])
        return Tokenizer(inner, pad_token_id=inner.token_to_id("[PAD]"), unk_token_id=inner.token_to_id("[UNK]"),
                         mask_token_id=inner.token_to_id("[MASK]"), cls_token_id=cls, sep_token_id=sep)
    eos = inner.token_to_id("<eos>")
    return Tokenizer(inner, eos_token_id=eos, unk_token_id=inner.token_to_id("<unk>"))


def tiny_decoder(vocab_size: int, seed: int = 0, layers: int = 2, dim: int = 32) -> minift.Transformer:
    torch.manual_seed(seed)
    config = ModelConfig(model_type="llama", vocab_size=vocab_size, dim=dim, n_layers=layers, n_heads=4,
                         n_kv_heads=2, hidden_dim=64, max_seq_len=256, tie_embeddings=True)
    return minift.Transformer(config)


def tiny_encoder(vocab_size: int, seed: int = 0, layers: int = 2, dim: int = 32) -> minift.Transformer:
    torch.manual_seed(seed)
    config = ModelConfig(model_type="bert", vocab_size=vocab_size, dim=dim, n_layers=layers, n_heads=4,
                         hidden_dim=64, max_seq_len=128, causal=False, norm="layer", norm_eps=1e-12, post_norm=True,
                         positions="learned", mlp="gelu", activation="gelu", qkv_bias=True, out_bias=True,
                         mlp_bias=True, type_vocab_size=2, lm_head=False)
    return minift.Transformer(config)


def alpaca_texts() -> list[str]:
    return [alpaca_prompt(r["instruction"], r["input"]) + " " + r["output"] for r in ALPACA]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def save_tiny_decoder(directory: Path, extra_texts: list[str] = (), seed: int = 0, dim: int = 32) -> Path:
    """A Hugging Face directory holding a tiny random decoder and a word tokenizer covering the test data."""
    tokenizer = word_tokenizer(alpaca_texts() + SENTENCES + list(extra_texts))
    minift.save(tiny_decoder(tokenizer.vocab_size, seed, dim=dim), tokenizer, directory)
    return directory


def save_tiny_encoder(directory: Path, extra_texts: list[str] = (), seed: int = 0) -> Path:
    tokenizer = word_tokenizer([r["text"] for r in SENTIMENT] + SENTENCES + list(extra_texts), encoder=True)
    minift.save(tiny_encoder(tokenizer.vocab_size, seed), tokenizer, directory)
    return directory


def run_config(model_dir: Path, train_file: Path | str, output_dir: Path, *overrides: str):
    """A RunConfig for a tiny, quiet run; `overrides` are --set strings applied after the defaults."""
    from minift.train.run_config import RunConfig, apply_override

    config = RunConfig()
    defaults = [f"model.source={model_dir}", f"data.train={train_file}", f"train.output_dir={output_dir}",
                "train.progress_bar=false", "train.device=cpu", "train.batch_size=2", "train.lr=3e-3",
                "data.validation_fraction=0"]
    for item in defaults + list(overrides):
        apply_override(config, item)
    return config


def bitsandbytes_in_float32(model: torch.nn.Module) -> torch.nn.Module:
    """Make bitsandbytes' Linear4bit layers compute in their compute_dtype on every CPU, as they do on the GPU.

    On a CPU with AVX512-BF16, bitsandbytes 0.50's Linear4bit.forward (nn/modules.py), at the first call in eval
    mode without gradients, repacks the weight for a fused kernel that computes in bfloat16 whatever compute_dtype
    says (logits 4e-3 off float32 on test_qlora's tiny model), and the repacking assumes in_features is a multiple
    of the blocksize (a 32-wide layer fails: "shape '[32, 0]' is invalid"). Parity tests compare float32 with
    float32, so they switch that path off; the flag is read in forward only."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny models run fastest on one thread, and do not fight other test processes for the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def assert_bad_config_json_is_one_line(folder: Path, raw: dict, message: str, capsys) -> None:
    """Write `raw` as folder/config.json: minift.load raises '<that file>: <message>...', and `minift generate` on it
    exits 2 with one `minift: error:` line naming config.json."""
    from minift.cli import main

    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError) as error:
        minift.load(folder)
    assert str(error.value).startswith(f"{folder / 'config.json'}: {message}"), str(error.value)
    assert main(["generate", "--model", str(folder), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("minift: error: ") and "config.json" in err[0], err


def save_random_reference(model: torch.nn.Module, directory: Path, also_biases: bool = False) -> torch.nn.Module:
    """A freshly built transformers model with its norm weights (and biases, if asked) moved off their constant
    initial values by N(0, 0.3) noise, so a missing or misread norm offset cannot pass a parity test; saved to
    `directory` and returned in eval mode. Seeded by the caller (torch.manual_seed before building the model)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or (also_biases and name.endswith("bias")):
                p.add_(torch.randn_like(p) * 0.3)
    model.eval().save_pretrained(directory)
    return model


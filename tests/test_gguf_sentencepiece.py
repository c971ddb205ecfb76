"""SentencePiece ("llama") vocabularies in GGUF: minift's tokenizer against the `sentencepiece` library.

A tiny SentencePiece BPE model (byte fallback on, no normalization, as Llama / Gemma train theirs) is trained in
the test on a few lines of text; its pieces, scores and types are written into a GGUF file with gguf.GGUFWriter
the way llama.cpp's converter writes them (tokenizer.ggml.model = "llama"). minift builds its tokenizer from
that file, and its ids and decoded text must equal sentencepiece's on texts with runs of spaces, unicode the
vocabulary lacks (byte fallback), digits and punctuation. Exact equality: both are deterministic.
"""

import pytest

from minift.io.gguf import read_gguf, tokenizer_from_gguf

gguf = pytest.importorskip("gguf")
spm = pytest.importorskip("sentencepiece")

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a fine-tuning framework reads and writes model files",
    "tokens, scores and types: the vocabulary of a sentencepiece model",
    "numbers like 12345 and 678 appear here and there, then the end.",
    "the theory of the thing: there, then, they, them, these, those",
] * 20
TEXTS = [
    "the quick brown fox",
    "Hello  world,   with   runs of spaces ",
    " leading space and trailing  ",
    "unicode the vocabulary lacks: café, naïve, 東京, emoji 🙂!",
    "digits 0123456789 and symbols #$%^&*()[]{}",
    "tabs\tand\nnewlines\n\nhere",
    "x",
]


def spm_model(tmp_path, prefix=True):
    trainer_args = dict(
        sentence_iterator=iter(CORPUS), model_prefix=str(tmp_path / "sp"), vocab_size=420, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=prefix, character_coverage=1.0, split_digits=False,
        user_defined_symbols=["<extra_1>"], minloglevel=2)
    spm.SentencePieceTrainer.train(**trainer_args)
    return spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))


def write_vocab(path, sp, prefix=True):
    """The model's vocabulary as llama.cpp's converter stores it (token types: sentencepiece's piece kinds)."""
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        kind = (2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i)
                else 5 if sp.is_unused(i) else 4 if tokens[-1] == "<extra_1>" else 1)
        types.append(kind)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())
    writer.add_unk_token_id(sp.unk_id())
    writer.add_add_bos_token(True)
    writer.add_add_space_prefix(prefix)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("prefix", [True, False], ids=["space-prefix", "no-prefix (gemma)"])
def test_sentencepiece_gguf_tokenizer_equals_sentencepiece(tmp_path, prefix):
    sp = spm_model(tmp_path, prefix)
    ours = tokenizer_from_gguf(read_gguf(write_vocab(tmp_path / "v.gguf", sp, prefix)).metadata, "v.gguf")
    assert ours.vocab_size == sp.get_piece_size()
    assert (ours.bos_token_id, ours.eos_token_id, ours.unk_token_id) == (sp.bos_id(), sp.eos_id(), sp.unk_id())
    used_bytes = False
    for text in TEXTS:
        expected = sp.encode(text)
        got = ours.encode(text)
        assert got == expected, (text, [sp.id_to_piece(i) for i in got], [sp.id_to_piece(i) for i in expected])
        assert ours.decode(got) == sp.decode(expected), text
        assert ours.encode(text, add_special_tokens=True) == [sp.bos_id(), *expected]  # add_bos_token
        used_bytes |= any(sp.is_byte(i) for i in got)
    assert used_bytes  # the byte fallback was exercised
    assert ours.decode([sp.bos_id(), *sp.encode("the end")]) == sp.decode(sp.encode("the end"))  # bos skipped


def test_sentencepiece_gguf_without_scores_is_refused(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "bad.gguf"), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(["<unk>", "a"])
    writer.add_token_types([2, 1])
    writer.write_header_to_file(); writer.write_kv_data_to_file(); writer.write_tensors_to_file(); writer.close()
    with pytest.raises(ValueError, match="tokenizer.ggml.scores"):
        tokenizer_from_gguf(read_gguf(tmp_path / "bad.gguf").metadata, "bad.gguf")


@pytest.mark.parametrize("prefix", [True, False], ids=["space-prefix", "no-prefix (gemma)"])
def test_sentencepiece_vocabulary_written_back_tokenizes_alike(tmp_path, prefix):
    """GGUF out (minift/io/gguf_write.py): the tokenizer read from the file, and the same vocabulary as a Hugging
    Face tokenizer.json would spell it (a Metaspace pre-tokenizer instead of normalizers), written as a "llama"
    vocabulary with scores -(merge rank) and read back, tokenize as sentencepiece does."""
    import json

    from tokenizers import Tokenizer as HFTokenizer

    from minift.io.gguf_write import tokenizer_metadata
    from minift.tokenizer import Tokenizer

    sp = spm_model(tmp_path, prefix)
    ours = tokenizer_from_gguf(read_gguf(write_vocab(tmp_path / "v.gguf", sp, prefix)).metadata, "v.gguf")
    spec = json.loads(ours.inner.to_str())
    spec["normalizer"] = None
    spec["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "split": False,
                             "prepend_scheme": "first" if prefix else "never"}
    hf_style = Tokenizer(HFTokenizer.from_str(json.dumps(spec)), bos_token_id=ours.bos_token_id,
                         eos_token_id=ours.eos_token_id, unk_token_id=ours.unk_token_id)
    for source in (ours, hf_style):
        metadata = {key: value.value for key, value in tokenizer_metadata(source).items()}
        assert metadata["tokenizer.ggml.model"] == "llama" and metadata["tokenizer.ggml.add_space_prefix"] == prefix
        types = metadata["tokenizer.ggml.token_type"]
        assert types[sp.unk_id()] == 2 and types[sp.bos_id()] == 3 and types.count(6) == 256
        back = tokenizer_from_gguf(metadata, "written")
        for text in TEXTS:
            if source is hf_style and text.startswith(" "):
                continue  # Metaspace adds no "▁" before a leading space; SentencePiece (and the file) does
            assert back.encode(text) == sp.encode(text), text
            assert back.encode(text, add_special_tokens=True) == [sp.bos_id(), *sp.encode(text)]

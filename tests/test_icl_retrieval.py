"""Retrieval-augmented prompting: chunking, the safetensors index round trip, top-k search, the prompt."""

import pytest
import torch

from minift.icl.embeddings import Embedder
from minift.icl.retrieval import VectorIndex, answer_question, chunk_text, rag_prompt
from tests.test_icl_support import ByteTokenizer, tiny_decoder


class BagOfWords:
    """A transparent embedder: counts of hashed words, so similar wording means similar vectors."""

    dim = 64

    def embed(self, texts):
        out = torch.zeros(len(texts), self.dim)
        for i, text in enumerate(texts):
            for word in text.lower().replace("?", " ").replace(".", " ").split():
                out[i, sum(map(ord, word)) % self.dim] += 1.0
        return torch.nn.functional.normalize(out, dim=-1)


DOCS = {
    "paris": "Paris is the capital of France. The Eiffel Tower stands on the Champ de Mars in Paris.",
    "nile": "The Nile is a river in Africa. It flows north into the Mediterranean Sea through Egypt.",
    "python": "Python is a programming language created by Guido van Rossum and released in 1991.",
}


def test_chunks_overlap_and_cover_the_text():
    words = [f"w{i}" for i in range(23)]
    chunks = chunk_text(" ".join(words), chunk_size=10, overlap=3)
    assert chunks[0].split() == words[:10] and chunks[1].split() == words[7:17] and chunks[-1].split()[-1] == "w22"
    assert chunk_text("a b c", chunk_size=10, overlap=3) == ["a b c"] and chunk_text("   ") == []
    with pytest.raises(ValueError, match="overlap"):
        chunk_text("a b", chunk_size=5, overlap=5)


def test_index_search_and_round_trip(tmp_path):
    index = VectorIndex.build(DOCS, BagOfWords(), chunk_size=8, overlap=2, embedder_name="bag-of-words")
    assert len(index) > len(DOCS)  # documents were split into chunks
    top = index.search("Which river flows through Egypt?", BagOfWords(), k=2)
    assert top[0].source == "nile" and top[0].score >= top[1].score
    path = index.save(tmp_path / "index.safetensors")
    loaded = VectorIndex.load(path)
    assert loaded.texts == index.texts and loaded.sources == index.sources
    assert loaded.metadata == {"chunk_size": "8", "overlap": "2", "embedder": "bag-of-words"}
    torch.testing.assert_close(loaded.embeddings, index.embeddings)
    assert [r.text for r in loaded.search("capital of France", BagOfWords(), k=1)] == \
           [r.text for r in index.search("capital of France", BagOfWords(), k=1)]
    # Non-ASCII text survives the byte packing.
    uni = VectorIndex.build(["Zürich — café ☕"], BagOfWords())
    assert VectorIndex.load(uni.save(tmp_path / "u.safetensors")).texts == ["Zürich — café ☕"]


def test_index_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such index"):
        VectorIndex.load(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a minift index"):
        VectorIndex.load(tmp_path / "other.safetensors")
    index = VectorIndex.build(DOCS, BagOfWords())
    with pytest.raises(ValueError, match="dims"):
        index.search("q", Embedder(tiny_decoder(), ByteTokenizer()), k=1)  # a 32-dim embedder on a 64-dim index


def test_rag_prompt_and_answer():
    index = VectorIndex.build(DOCS, BagOfWords(), chunk_size=12, overlap=3)
    passages = index.search("Who created Python?", BagOfWords(), k=2)
    prompt = rag_prompt("Who created Python?", passages)
    assert prompt.startswith("Answer the question") and prompt.endswith("Question: Who created Python?\nAnswer:")
    assert f"[1] {passages[0].text}" in prompt and "Guido" in prompt
    chat = rag_prompt("Who created Python?", passages, chat=True)
    assert chat.startswith("<|im_start|>system\n") and chat.endswith("<|im_start|>assistant\n")
    model, tok = tiny_decoder(), ByteTokenizer()
    result = answer_question(model, tok, index, BagOfWords(), "Who created Python?", k=2, chat=False,
                             max_new_tokens=6)
    assert result.prompt == prompt and [p.text for p in result.passages] == [p.text for p in passages]
    ids = torch.tensor([tok.encode(prompt)])
    greedy = model.generate(ids, max_new_tokens=6, eos_token_id=tok.eos_token_id)[0, ids.size(1):].tolist()
    if tok.eos_token_id in greedy:
        greedy = greedy[: greedy.index(tok.eos_token_id)]
    assert result.answer == tok.decode(greedy).split("\n")[0].strip()

"""Retrieval-augmented prompting: chunk documents, embed them, keep the index on disk, answer from the top-k.

Lesson
------
A small model does not know your documents, and a long document does not fit in its context. RAG
(Lewis et al. 2020) retrieves the few passages most similar to the question and puts only those into
the prompt:

    documents --chunk_text--> overlapping word windows --Embedder--> unit vectors (N, d)   } VectorIndex
                                                                         | save / load (safetensors)
    question --Embedder--> q (d,) --cosine = chunks @ q--> top-k chunks --+
                                                          --rag_prompt--> "Context: [1] .. [k]
                                                                           Question: ..  Answer:"
                                                          --generate--> answer

Chunks overlap (default 80 words, 20 shared with the next chunk) so a fact cut by a boundary survives
whole in one of the two neighbours. The index is one safetensors file, no pickle:

    embeddings      float32 (N, d)
    text_bytes      uint8   all chunk texts, UTF-8, concatenated
    text_offsets    int64   (N + 1,) chunk i is text_bytes[offsets[i]:offsets[i+1]]
    source_bytes / source_offsets    the same for each chunk's document name
    metadata        {"format": "minift-index", "version": "1", "chunk_size", "overlap", "embedder"}
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from minift.icl.templates import CHATML_END, chatml_turn
from minift.io.files import read_safetensors_with_metadata, write_safetensors_atomic

INDEX_FORMAT, INDEX_VERSION = "minift-index", "1"


def chunk_text(text: str, chunk_size: int = 80, overlap: int = 20) -> list[str]:
    """Split into windows of `chunk_size` words, each sharing `overlap` words with the next."""
    if chunk_size <= 0 or not 0 <= overlap < chunk_size:
        raise ValueError(f"need chunk_size > 0 and 0 <= overlap < chunk_size (got {chunk_size}, {overlap})")
    words = text.split()
    chunks = []
    for start in range(0, len(words), chunk_size - overlap):
        chunks.append(" ".join(words[start:start + chunk_size]))
        if start + chunk_size >= len(words):
            break
    return chunks


def _pack_strings(strings: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    encoded = [s.encode("utf-8") for s in strings]
    offsets = torch.zeros(len(encoded) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor([len(b) for b in encoded], dtype=torch.int64).cumsum(0) if encoded else 0
    data = torch.frombuffer(bytearray(b"".join(encoded)) or bytearray(1), dtype=torch.uint8).clone()
    return data, offsets


def _unpack_strings(data: torch.Tensor, offsets: torch.Tensor) -> list[str]:
    raw, cuts = data.numpy().tobytes(), offsets.tolist()
    return [raw[cuts[i]:cuts[i + 1]].decode("utf-8") for i in range(len(cuts) - 1)]


@dataclass
class Retrieved:
    text: str
    source: str
    score: float  # cosine similarity to the question


class VectorIndex:
    """Chunks, their sources and their unit embeddings; exact cosine search (a matrix-vector product)."""

    def __init__(self, texts: list[str], sources: list[str], embeddings: torch.Tensor, metadata: dict | None = None):
        if not (len(texts) == len(sources) == embeddings.size(0)):
            raise ValueError(f"index: {len(texts)} chunks, {len(sources)} sources, {embeddings.size(0)} embeddings")
        self.texts, self.sources = list(texts), list(sources)
        self.embeddings = F.normalize(embeddings.float(), dim=-1)  # (N, d)
        self.metadata = dict(metadata or {})

    def __len__(self) -> int:
        return len(self.texts)

    @classmethod
    def build(cls, documents: dict[str, str] | list[str], embedder, chunk_size: int = 80, overlap: int = 20,
              embedder_name: str = "") -> "VectorIndex":
        """Chunk every document (a dict name -> text, or a list named doc0, doc1, ...) and embed the chunks."""
        if isinstance(documents, list):
            documents = {f"doc{i}": text for i, text in enumerate(documents)}
        texts, sources = [], []
        for name, text in documents.items():
            for chunk in chunk_text(text, chunk_size, overlap):
                texts.append(chunk)
                sources.append(name)
        if not texts:
            raise ValueError("VectorIndex.build: the documents contain no words")
        metadata = {"chunk_size": str(chunk_size), "overlap": str(overlap), "embedder": embedder_name}
        return cls(texts, sources, embedder.embed(texts), metadata)

    def search(self, query: str, embedder, k: int = 3) -> list[Retrieved]:
        q = F.normalize(embedder.embed([query]).float(), dim=-1)[0]  # (d,)
        if q.numel() != self.embeddings.size(1):
            raise ValueError(f"query embedding has {q.numel()} dims but the index has {self.embeddings.size(1)}: "
                             "use the embedder the index was built with")
        scores = self.embeddings @ q  # (N,)
        top = torch.topk(scores, min(k, len(self)))
        return [Retrieved(self.texts[i], self.sources[i], float(s)) for s, i in zip(top.values, top.indices.tolist())]

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        text_bytes, text_offsets = _pack_strings(self.texts)
        source_bytes, source_offsets = _pack_strings(self.sources)
        tensors = {"embeddings": self.embeddings.contiguous(), "text_bytes": text_bytes, "text_offsets": text_offsets,
                   "source_bytes": source_bytes, "source_offsets": source_offsets}
        metadata = {**self.metadata, "format": INDEX_FORMAT, "version": INDEX_VERSION}
        write_safetensors_atomic(tensors, path, metadata={k: str(v) for k, v in metadata.items()})
        return path

    @classmethod
    def load(cls, path: str | Path) -> "VectorIndex":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such index file (build one with VectorIndex.build(...).save(path))")
        t, metadata = read_safetensors_with_metadata(path)
        if metadata.get("format") != INDEX_FORMAT:
            raise ValueError(f"{path}: not a minift index (metadata format={metadata.get('format')!r})")
        missing = {"embeddings", "text_bytes", "text_offsets", "source_bytes", "source_offsets"} - set(t)
        if missing:
            raise ValueError(f"{path}: index is missing tensors {sorted(missing)}")
        texts = _unpack_strings(t["text_bytes"], t["text_offsets"])
        sources = _unpack_strings(t["source_bytes"], t["source_offsets"])
        meta = {k: v for k, v in metadata.items() if k not in ("format", "version")}
        return cls(texts, sources, t["embeddings"], meta)


def rag_prompt(question: str, passages: list[Retrieved], chat: bool = False) -> str:
    """The question preceded by numbered context passages; plain completion or ChatML."""
    context = "\n".join(f"[{i + 1}] {p.text}" for i, p in enumerate(passages))
    instruction = "Answer the question using only the context. Answer briefly."
    if chat:
        return (chatml_turn("system", instruction)
                + chatml_turn("user", f"Context:\n{context}\n\nQuestion: {question}")
                + chatml_turn("assistant", "", close=False))
    return f"{instruction}\n\nContext:\n{context}\n\nQuestion: {question}\nAnswer:"


@dataclass
class RAGAnswer:
    answer: str
    passages: list[Retrieved]
    prompt: str


@torch.no_grad()
def answer_question(model, tokenizer, index: VectorIndex, embedder, question: str, k: int = 3, chat: bool = True,
                    max_new_tokens: int = 48) -> RAGAnswer:
    """Retrieve the top-k chunks, put them in the prompt and generate greedily."""
    passages = index.search(question, embedder, k)
    prompt = rag_prompt(question, passages, chat=chat)
    ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)])
    stop = [tokenizer.eos_token_id] if getattr(tokenizer, "eos_token_id", None) is not None else []
    end = tokenizer.encode(CHATML_END, add_special_tokens=False)
    if chat and len(end) == 1:
        stop.append(end[0])
    out = model.generate(ids.to(next(model.parameters()).device), max_new_tokens=max_new_tokens,
                         eos_token_id=stop or None)
    new = out[0, ids.size(1):].tolist()
    new = new[: next((i for i, t in enumerate(new) if t in stop), len(new))]
    answer = tokenizer.decode(new).strip()
    if not chat:
        answer = answer.split("\n")[0].strip()  # a completion model keeps writing: the first line is the answer
    return RAGAnswer(answer, passages, prompt)

"""Sentence embeddings from any minift model: mean-pooled hidden states, L2-normalised.

Lesson
------
Sentence-BERT (Reimers & Gurevych 2019, §3) turns a sequence of hidden states into one vector by
averaging them over the real (non-padding) tokens:

    h = model(ids)                  # (B, T, d) hidden states of the last layer
    e = sum_t mask_t * h_t / sum_t mask_t          # (B, d) mean over real tokens
    e = e / ||e||                   # unit length: cosine similarity becomes a dot product

all-MiniLM-L6-v2 (the bundled "minilm-l6") was trained exactly for this pooling, so it is the default.
Any other minift model works too: a decoder (SmolLM2) gives its final-norm hidden states through
`return_hidden=True`. With right padding a causal model's real tokens never see the pads, and the mask
removes the pads from the mean, so batching does not change any embedding.

KATE (Liu et al. 2022, "What Makes Good In-Context Examples for GPT-3?") picks the demonstrations whose
embeddings are nearest to the query's; `selectors.KNNSelector` does that with this class.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm import tqdm


class Embedder:
    """Embed texts with a minift model and its tokenizer.

        embedder = Embedder.from_pretrained("minilm-l6")
        vectors = embedder.embed(["a tweet", "another tweet"])   # (2, 384), each of norm 1
    """

    def __init__(self, model, tokenizer, batch_size: int = 64, max_length: int = 128, normalize: bool = True,
                 add_special_tokens: bool = True, progress: bool | None = False) -> None:
        if tokenizer is None:
            raise ValueError("Embedder needs the model's tokenizer (minift.load returned none for this source)")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.batch_size, self.max_length, self.normalize = batch_size, max_length, normalize
        self.add_special_tokens = add_special_tokens
        self.progress = progress  # a bar over the batches: True, False, or None (on a terminal only)
        self.pad_id = getattr(tokenizer, "pad_token_id", None) or 0

    @classmethod
    def from_pretrained(cls, source: str = "minilm-l6", **kwargs) -> "Embedder":
        """Load `source` with minift.load (a bundled name, .gguf file or Hugging Face directory)."""
        from minift.io import load

        model, tokenizer = load(source)
        return cls(model, tokenizer, **kwargs)

    @property
    def dim(self) -> int:
        return self.model.config.dim

    def _token_ids(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=self.add_special_tokens)
        if len(ids) > self.max_length:  # keep the last token: an encoder's [SEP] closes the sequence
            ids = ids[: self.max_length - 1] + ids[-1:]
        return ids or [self.pad_id]

    @torch.no_grad()
    def embed(self, texts: list[str]) -> torch.Tensor:
        """(N, d) float32 embeddings, in the order of `texts`."""
        if isinstance(texts, str):
            raise TypeError("Embedder.embed takes a list of texts, not one string")
        if len(texts) == 0:
            return torch.zeros(0, self.dim)
        device = next(self.model.parameters()).device
        encoded = [self._token_ids(t) for t in texts]
        order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))  # similar lengths -> little padding
        out = torch.zeros(len(texts), self.dim)
        starts = range(0, len(order), self.batch_size)
        bar_off = None if self.progress is None else not self.progress
        for start in tqdm(starts, desc="embedding", unit="batch", disable=True if len(starts) < 2 else bar_off):
            rows = order[start:start + self.batch_size]
            width = max(len(encoded[i]) for i in rows)
            ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros(len(rows), width, dtype=torch.long)
            for r, i in enumerate(rows):  # right padding
                ids[r, : len(encoded[i])] = torch.tensor(encoded[i])
                mask[r, : len(encoded[i])] = 1
            hidden = self._hidden_states(ids.to(device), mask.to(device)).float()  # (b, T, d)
            weights = mask.to(hidden.device)[:, :, None].float()  # (b, T, 1)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)  # (b, d)
            out[rows] = pooled.cpu()
        return F.normalize(out, dim=-1) if self.normalize else out

    def _hidden_states(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.model.config.causal:
            return self.model(ids, attention_mask=mask, return_hidden=True)  # (b, T, d)
        return self.model(ids, attention_mask=mask)  # encoders return hidden states already


class PrecomputedEmbedder:
    """Look-up embeddings for a fixed set of texts (tests, or vectors computed elsewhere)."""

    def __init__(self, table: dict[str, torch.Tensor], normalize: bool = True) -> None:
        self.table = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in table.items()}
        self.normalize = normalize

    @property
    def dim(self) -> int:
        return next(iter(self.table.values())).numel()

    def embed(self, texts: list[str]) -> torch.Tensor:
        missing = [t for t in texts if t not in self.table]
        if missing:
            raise KeyError(f"PrecomputedEmbedder has no vector for {missing[0]!r}")
        out = torch.stack([self.table[t] for t in texts]) if texts else torch.zeros(0, self.dim)
        return F.normalize(out, dim=-1) if self.normalize else out

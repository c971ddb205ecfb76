"""Every record format against every task kind, for `minift eval`, `minift icl` and `minift finetune`.

Each combination either works (exit 0) or stops with exit 2 and exactly one `minift: error:` line that says
what is wrong; nothing may raise (a traceback fails the test). Formats (module docstring of minift/data.py):
text, prompt_completion, alpaca, chat, classification (text + label) and masked-LM text, each as JSONL and CSV.
Task kinds: causal_lm (a tiny decoder), masked_lm and classification (a tiny encoder; for eval and icl a
directory with task.json + head.safetensors, as `minift export` writes it).

What the table expects, in words:
* a causal LM reads text, prompt_completion, alpaca and chat (eval detects the format; finetune reads
  data.format, default text, and points at the right format when the fields say otherwise); the label of a
  text + label record is not used. Chat needs JSONL: a CSV cell cannot hold a list of messages.
* a masked LM reads a text field (a label beside it is not used); any other format is an error.
* a classifier reads text + label; anything without both is "a classification model needs ...".
* icl reads text + label only, and scores labels with a causal LM: an encoder is an error.
"""

import csv
import json
import re
from pathlib import Path

import pytest

import minift
from minift.cli import main
from minift.train.tasks import build_task_model, save_head
from tests.train_helpers import ALPACA, SENTENCES, SENTIMENT, save_tiny_decoder, save_tiny_encoder, write_jsonl
from tests.train_helpers import single_thread  # noqa: F401  (autouse fixture: one torch thread)

CHATML = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
RECORDS = {
    "text": [{"text": s} for s in SENTENCES[:6]],
    "prompt_completion": [{"prompt": " ".join(s.split()[:4]), "completion": " ".join(s.split()[4:])}
                          for s in SENTENCES[:6]],
    "alpaca": ALPACA,
    "chat": [{"messages": [{"role": "user", "content": f"{r['instruction']} {r['input']}"},
                           {"role": "assistant", "content": r["output"]}]} for r in ALPACA],
    "classification": SENTIMENT,
    "mlm_text": [{"text": s} for s in SENTENCES[6:]],
}
KINDS = ("causal_lm", "masked_lm", "classification")
EXTENSIONS = (".jsonl", ".csv")
LM_FORMATS = ("prompt_completion", "alpaca", "chat")  # a causal LM needs data.format for these in finetune

NEEDS_LABEL = r"a classification model needs a label field 'label' \(record has \['text'\]\)"
NEEDS_TEXT_AND_LABEL = r"a classification model needs a text field 'text' and a label field 'label'"
MLM_NEEDS_TEXT = r"a masked-LM model reads plain text from a field 'text' \(record has \[.*\]\); the fields look like"


def expected_error(command: str, kind: str, fmt: str, ext: str, data_format: str | None = None) -> str | None:
    """None where the combination must work; otherwise a regex of the one error line."""
    if command == "icl":
        if fmt in ("text", "mlm_text"):
            return r"no field 'label' \(fields: text\); choose one with --label-field"
        if fmt != "classification":
            return r"no field 'text' .*; choose one with --text-field"
        return None if kind == "causal_lm" else "label scoring needs a causal language model"
    if kind == "causal_lm":
        if command == "finetune" and data_format is None and fmt in LM_FORMATS:
            return rf"missing field 'text' \(format text needs \['text'\]; .*: set the format to {fmt} \(--format"
        if fmt == "chat" and ext == ".csv":
            return r":2: field 'messages' is a string, .*write chat records as JSONL"
        return None
    if kind == "masked_lm":
        return None if fmt in ("text", "classification", "mlm_text") else MLM_NEEDS_TEXT
    if fmt == "classification":
        return None
    return NEEDS_LABEL if fmt in ("text", "mlm_text") else NEEDS_TEXT_AND_LABEL


def write_records(path: Path, records: list[dict]) -> Path:
    if path.suffix == ".jsonl":
        return write_jsonl(path, records)
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=list(records[0]))
        writer.writeheader()
        for record in records:
            writer.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in record.items()})
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Data files (format x extension) and models: a decoder with a ChatML template, a plain encoder (finetune),
    and encoder directories with a masked-LM head and with a 2-label classification head (eval, icl)."""
    root = tmp_path_factory.mktemp("formats")
    words = [json.dumps(r) for rs in RECORDS.values() for r in rs]  # every word of the data is in the vocabularies
    decoder = save_tiny_decoder(root / "decoder", words)
    _, tokenizer = minift.load(decoder)
    tokenizer.chat_template = CHATML
    tokenizer.save(decoder)
    models = {"decoder": decoder, "encoder": save_tiny_encoder(root / "encoder", words)}
    for kind, labels in (("masked_lm", None), ("classification", ["negative", "positive"])):
        directory = save_tiny_encoder(root / kind, words)
        backbone, _ = minift.load(directory)
        save_head(build_task_model(backbone, kind, num_labels=len(labels) if labels else None), directory, labels)
        models[kind] = directory
    files = {(fmt, ext): write_records(root / f"{fmt}{ext}", records)
             for fmt, records in RECORDS.items() for ext in EXTENSIONS}
    return models, files


def check(status: int, capsys, error: str | None) -> str:
    """Assert the outcome; returns stdout."""
    captured = capsys.readouterr()
    if error is None:
        assert status == 0 and "error" not in captured.err, captured.err
        return captured.out
    lines = captured.err.splitlines()
    assert status == 2 and len(lines) == 1 and lines[0].startswith("minift: error: "), captured.err
    assert re.search(error, lines[0]), f"{lines[0]!r} does not match {error!r}"
    return captured.out


CASES = [(kind, fmt, ext) for kind in KINDS for fmt in RECORDS for ext in EXTENSIONS]
IDS = [f"{kind}-{fmt}-{ext[1:]}" for kind, fmt, ext in CASES]


@pytest.mark.parametrize("kind,fmt,ext", CASES, ids=IDS)
def test_eval(setup, capsys, kind, fmt, ext):
    models, files = setup
    model = models["decoder" if kind == "causal_lm" else kind]
    status = main(["eval", "--model", str(model), "--data", str(files[fmt, ext]), "--max-length", "64",
                   "--device", "cpu"])
    out = check(status, capsys, expected_error("eval", kind, fmt, ext))
    if status == 0:
        metrics = json.loads(out.splitlines()[-1])
        assert metrics["eval_targets"] > 0 or kind == "masked_lm"
        assert ("eval_accuracy" in metrics) == (kind == "classification")


@pytest.mark.parametrize("kind,fmt,ext", CASES, ids=IDS)
def test_icl(setup, capsys, kind, fmt, ext):
    models, files = setup
    model = models["decoder" if kind == "causal_lm" else kind]
    path = str(files[fmt, ext])
    status = main(["icl", "--model", str(model), "--train", path, "--test", path, "--shots", "1", "--max-test", "2"])
    out = check(status, capsys, expected_error("icl", kind, fmt, ext))
    if status == 0:
        assert "accuracy" in out


def finetune(models, files, tmp_path, kind, fmt, ext, *sets: str) -> int:
    config = tmp_path / "run.toml"
    config.write_text(f"""
[model]
source = "{models['decoder' if kind == 'causal_lm' else 'encoder']}"
[task]
kind = "{kind}"
[data]
train = "{files[fmt, ext]}"
validation_fraction = 0
max_length = 64
[train]
output_dir = "{tmp_path / 'run'}"
max_steps = 1
batch_size = 4
device = "cpu"
progress_bar = false
save_checkpoints = false
export = false
""")
    return main(["finetune", str(config), *[x for s in sets for x in ("--set", s)]])


@pytest.mark.parametrize("kind,fmt,ext", CASES, ids=IDS)
def test_finetune(setup, capsys, tmp_path, kind, fmt, ext):
    models, files = setup
    status = finetune(models, files, tmp_path, kind, fmt, ext)
    out = check(status, capsys, expected_error("finetune", kind, fmt, ext))
    if status == 0:
        assert f"task {kind}" in out and "done: step 1" in out


LM_CASES = [(fmt, ext) for fmt in LM_FORMATS for ext in EXTENSIONS]


@pytest.mark.parametrize("fmt,ext", LM_CASES, ids=[f"{fmt}-{ext[1:]}" for fmt, ext in LM_CASES])
def test_finetune_causal_lm_with_its_data_format(setup, capsys, tmp_path, fmt, ext):
    models, files = setup
    status = finetune(models, files, tmp_path, "causal_lm", fmt, ext, f"data.format={fmt}")
    out = check(status, capsys, expected_error("finetune", "causal_lm", fmt, ext, data_format=fmt))
    if status == 0:
        assert "done: step 1" in out


def test_causal_lm_eval_ignores_the_label_field(setup, capsys, tmp_path):
    """The reported crash: text + label records on a causal LM. The label is not used, and says so: the
    perplexity equals that of the same texts without labels."""
    models, _ = setup
    with_labels = write_jsonl(tmp_path / "labelled.jsonl", SENTIMENT)
    without = write_jsonl(tmp_path / "plain.jsonl", [{"text": r["text"]} for r in SENTIMENT])
    results = []
    for path in (with_labels, without):
        assert main(["eval", "--model", str(models["decoder"]), "--data", str(path), "--device", "cpu"]) == 0
        out = capsys.readouterr().out.splitlines()
        results.append((out[0], json.loads(out[-1])))
    assert "format text (the label field is not used); 8 examples" in results[0][0]
    assert "format text; 8 examples" in results[1][0]
    assert results[0][1] == results[1][1]


@pytest.mark.parametrize("model,flags,error", [
    ("decoder", ["--format", "mlm"], r"--format 'mlm': expected one of text, prompt_completion, alpaca, chat"),
    ("classification", ["--format", "text"], r"--format is for causal LM records; this classification model reads"),
    ("decoder", ["--format", "alpaca"], r":1: missing field 'instruction' \(format alpaca needs \['instruction', "
                                        r"'output'\]; record has \['text'\]\); the fields look like text records: "
                                        r"set the format to text"),
    ("decoder", ["--batch-size", "0"], r"--max-length and --batch-size must be >= 1, got 512 and 0"),
])
def test_eval_option_errors(setup, capsys, model, flags, error):
    models, files = setup
    status = main(["eval", "--model", str(models[model]), "--data", str(files["text", ".jsonl"]), *flags])
    check(status, capsys, error)

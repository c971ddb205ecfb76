"""`minift icl` (main_icl): reads JSONL and CSV, prints accuracy + a per-class table, fails clearly."""

import json

import pytest

import minift.io
from minift.data import read_records
from minift.icl.cli import main_icl, parse_verbalizers, read_labelled
from tests.test_icl_support import ByteTokenizer, tiny_decoder

TRAIN = [("I love this", "pos"), ("great flight", "pos"), ("awful delay", "neg"), ("lost my bag", "neg"),
         ("so happy", "pos"), ("terrible food", "neg")]
TEST = [("love the crew", "pos"), ("bag lost again", "neg"), ("happy landing", "pos")]


@pytest.fixture
def tiny_load(monkeypatch):
    """minift.io.load -> a tiny random model with a byte tokenizer (the CLI path is what is tested here)."""
    calls = []

    def fake_load(source, dtype=None, device=None):
        calls.append(source)
        return tiny_decoder(), ByteTokenizer()

    monkeypatch.setattr(minift.io, "load", fake_load)
    return calls


def write_jsonl(path, rows, text="text", label="label"):
    path.write_text("".join(json.dumps({text: t, label: y}) + "\n" for t, y in rows))
    return path


def write_csv(path, rows):
    path.write_text("label,text\n" + "".join(f'{y},"{t}"\n' for t, y in rows))
    return path


@pytest.mark.parametrize("selector", ["random", "bm25"])
def test_icl_prints_accuracy_and_per_class_table(tmp_path, tiny_load, capsys, selector):
    train = write_jsonl(tmp_path / "train.jsonl", TRAIN)
    test = write_csv(tmp_path / "test.csv", TEST)
    status = main_icl(["--model", "tiny", "--train", str(train), "--test", str(test), "--shots", "2",
                       "--selector", selector, "--calibrate"])
    out = capsys.readouterr().out
    assert status == 0 and tiny_load == ["tiny"]
    lines = out.splitlines()
    accuracy = [line for line in lines if line.startswith("accuracy")]
    assert len(accuracy) == 1 and accuracy[0].endswith("/3)")
    header = lines.index(next(line for line in lines if line.startswith("label")))
    assert [line.split()[0] for line in lines[header + 1: header + 3]] == ["neg", "pos"]
    assert "2-shot " + selector in out and "calibrated" in out


def test_icl_custom_fields_template_and_generation(tmp_path, tiny_load, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", TRAIN, text="tweet", label="sentiment")
    test = write_jsonl(tmp_path / "test.jsonl", TEST, text="tweet", label="sentiment")
    status = main_icl(["--model", "tiny", "--train", str(train), "--test", str(test), "--text-field", "tweet",
                       "--label-field", "sentiment", "--shots", "0", "--format", "Tweet: {text}\\nMood: {label}",
                       "--verbalizer", "pos=good,great", "--verbalizer", "neg=bad", "--method", "generate",
                       "--max-test", "2"])
    out = capsys.readouterr().out
    assert status == 0 and "zero-shot" in out and "/2)" in out


@pytest.mark.parametrize("content, message", [
    ('{"text": "a", "label": "pos"}\n{"text": "b", "label": \n', "train.jsonl:2: malformed JSON"),
    ('{"text": "a", "label": "pos"}\n{"body": "b", "label": "neg"}\n', "train.jsonl:2: no field 'text'"),
    ('{"text": "a", "label": ""}\n', "train.jsonl:1: field 'label' is empty"),
    ('["text", "label"]\n', "train.jsonl:1: expected a JSON object"),
    ("\n\n", "train.jsonl: empty dataset"),
])
def test_bad_train_file_is_a_clear_error(tmp_path, tiny_load, capsys, content, message):
    (tmp_path / "train.jsonl").write_text(content)
    test = write_jsonl(tmp_path / "test.jsonl", TEST)
    status = main_icl(["--model", "tiny", "--train", str(tmp_path / "train.jsonl"), "--test", str(test)])
    assert status == 2 and message in capsys.readouterr().err
    assert tiny_load == []  # input is checked before the model is loaded


def test_other_input_errors(tmp_path, tiny_load, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", TRAIN)
    cases = [
        (["--test", str(tmp_path / "nope.jsonl")], "nope.jsonl: no such file"),
        (["--test", str((tmp_path / "t.txt").resolve())], "unsupported file type '.txt'"),
        (["--test", str(write_jsonl(tmp_path / "odd.jsonl", [("x", "maybe")]))], "label 'maybe' never occurs"),
        (["--test", str(write_jsonl(tmp_path / "ok.jsonl", TEST)), "--shots", "-1"], "--shots must be >= 0"),
        (["--test", str(tmp_path / "ok.jsonl"), "--verbalizer", "pos"], "expected LABEL=word"),
        (["--test", str(tmp_path / "ok.jsonl"), "--verbalizer", "neutral=meh"], "does not use"),
        (["--test", str(tmp_path / "ok.jsonl"), "--format", "{text} only"], "{label} exactly once"),
    ]
    (tmp_path / "t.txt").write_text("x")
    for extra, message in cases:
        status = main_icl(["--model", "tiny", "--train", str(train)] + extra)
        err = capsys.readouterr().err
        assert status == 2 and message in err, (extra, err)
    assert main_icl(["--model", "tiny"]) == 2  # argparse: missing --train/--test
    assert main_icl(["--model", "tiny", "--train", str(train), "--test", str(train), "--selector", "dpp"]) == 2


def test_csv_reader_details(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text('label,text\npos,"caf\xe9, ""quoted"""\n', encoding="utf-8")
    assert read_labelled(path) == [(f"{path}:2", 'caf\xe9, "quoted"', "pos")]
    path.write_bytes("label,text\npos,caf\xe9\n".encode("latin-1"))  # not UTF-8: an error, never a guess
    with pytest.raises(ValueError, match=r"t\.csv: not valid UTF-8 \(byte 0xe9"):
        read_labelled(path)
    path.write_text("label,text\npos,a,extra\n")
    with pytest.raises(ValueError, match=r"t\.csv:2: more values than the 2 header columns"):
        read_labelled(path)
    assert parse_verbalizers(["a=x, y", "b=z"]) == {"a": ["x", "y"], "b": ["z"]}


@pytest.mark.parametrize("name", ["data.jsonl", "data.csv", "data.tsv"])
def test_icl_and_fine_tuning_read_the_same_records(tmp_path, name):
    """One reader: `minift icl` sees exactly the records (and places) that minift.data.read_records returns."""
    rows = [("caf\xe9, \"quoted\"", "pos"), ("  padded  ", "neg"), ("line one", "pos")]
    path = tmp_path / name
    if name.endswith(".jsonl"):
        lines = [json.dumps({"text": t, "label": y}) + "\n" for t, y in rows]
        text = lines[0] + "\n" + "".join(lines[1:])  # a blank line is skipped, and the line numbers still count it
    else:
        sep = "\t" if name.endswith(".tsv") else ","
        quote = lambda v: '"' + v.replace('"', '""') + '"'  # noqa: E731
        text = f"text{sep}label\n" + "".join(f"{quote(t)}{sep}{y}\n" for t, y in rows)
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))  # with a BOM, as Excel writes UTF-8
    records = read_records(path)
    assert read_labelled(path) == [(r.where, r["text"], r["label"]) for r in records]
    assert [(r["text"], r["label"]) for r in records] == rows

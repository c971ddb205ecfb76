"""The fuzz table: bad input to every `minift` subcommand is one line naming what is wrong, never a traceback.

One parametrized test, `test_fuzz`, runs every case of TABLE through `minift.cli.main([...])` in this process.
A case builds its input (a broken copy of a tiny artifact, a bad data file, a bad flag) and states the words
the error line must contain: the file (with its line), the config field, the flag or the tensor. Each case
must end with exit status 2 and exactly one stderr line starting `minift: error:` (a Ctrl-C case: exit 130
and one `minift: interrupted;` line naming the checkpoint to resume from).

The table joins the tables of the hardening tests (imported, not copied) with its own cases:

    corrupt/*    tests/test_corrupt_files.py CASES: model dirs, shards, 4-bit dirs, adapters, checkpoints, task heads
    config/*     tests/test_config_validation.py BAD_VALUES: one --set per config field out of range
    generate/*   tests/test_generate_options.py CLI_ERRORS, and bad model sources
    data/*       JSONL and CSV records for finetune, eval and icl
    toml/*       config files and --set syntax
    gguf/*       hand-written GGUF files (header, metadata, tensors)
    model/*, adapter/*, run/*, out/*, quantize/*, merge/*, export/*, eval/*, icl/*, demo/*
    guard/*      Ctrl-C, the run lock, a full disk (helpers of test_interrupts / test_config_validation), divergence
    align/*      reward / preference (DPO) / grpo / ppo: pair and prompt records, reward functions and reward models
    task/*       one bad --set of a [task] preference/RL option or a [train] distributed / fused_loss / compile one
    train/*      --nproc and train.distributed: refused in the launching process, before torchrun starts
    pairs/*, plan/*, family/* (config.json of Gemma 1/2/3, Phi-3 LongRoPE, Mistral/Qwen sliding windows, with the
    BAD_CONFIGS of tests/test_gemma.py and tests/test_phi3.py), export/gguf-*, gguf/kquant-* (a Q4_K tensor garbled)

KNOWN lists the cases that still fail in code another helper is writing: each runs as a strict xfail naming the defect.

Each case records its outcome as a user property, `outcome`: clean (the promise holds), crash (a Python
exception escaped main), silent (exit 0: the bad input was accepted) or unclear (exit 2 but not one line
naming the input). benchmarks/fuzz_summary.py runs this file and counts them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

import minift
from minift.cli import main
from minift.align.reward import RewardModel, save_reward_model
from minift.io.gguf import read_gguf
from minift.io.gguf_write import export_gguf
from minift.peft import LoRAConfig, add_lora, save_adapter
from minift.train.preference_tasks import reward_export_tokenizer
from tests.test_config_validation import BAD_VALUES, finetune_args, full_disk_when
from tests.test_corrupt_files import CASES as CORRUPT_CASES
from tests.test_corrupt_files import artifacts  # noqa: F401  (module fixture: the valid tiny artifacts)
from tests.test_corrupt_files import broken_copy, cli_arguments
from tests.test_gemma import BAD_CONFIGS as GEMMA_BAD_CONFIGS
from tests.test_generate_options import CLI_ERRORS, PROMPT
from tests.test_gguf_write import bpe_tokenizer, tiny_llama
from tests.test_phi3 import BAD_CONFIGS as PHI3_BAD_CONFIGS
from tests.test_interrupts import ctrl_c_in_step
from tests.test_run_lock import write_lock
from tests.train_helpers import SENTENCES, SENTIMENT, save_tiny_decoder, write_jsonl
from tests.train_helpers import single_thread  # noqa: F401  (autouse fixture: one torch thread)


# ----------------------------------------------------------------------------------------------------
# What a case gets: the valid artifacts, its own folder, monkeypatch
# ----------------------------------------------------------------------------------------------------


@dataclass
class Env:
    a: dict[str, Path]  # tests/test_corrupt_files.py's artifacts + this file's extras (fuzz_files)
    tmp: Path  # the case's own folder
    monkeypatch: pytest.MonkeyPatch

    def file(self, name: str, content: str | bytes) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        return path

    def copy(self, kind: str) -> Path:
        target = self.tmp / kind
        shutil.copytree(self.a[kind], target)
        return target

    @property
    def out(self) -> Path:
        return self.tmp / "out"


@dataclass
class Case:
    build: Callable[[Env], tuple[list[str], list[str]]]  # -> (argv, the words the line must contain)
    status: int = 2
    prefix: str = "minift: error:"


TABLE: dict[str, Case] = {}


def case(name: str, status: int = 2, prefix: str = "minift: error:"):
    def register(build):
        assert name not in TABLE, name
        TABLE[name] = Case(build, status, prefix)
        return build
    return register


def add(name: str, build, status: int = 2, prefix: str = "minift: error:") -> None:
    assert name not in TABLE, name
    TABLE[name] = Case(build, status, prefix)


# ----------------------------------------------------------------------------------------------------
# Extra artifacts: a GGUF writer, an adapter of another model's width, a classifier run
# ----------------------------------------------------------------------------------------------------

GGUF_STRING, GGUF_ARRAY, GGUF_UINT32, GGUF_FLOAT32 = 8, 9, 4, 6


def gguf_string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def gguf_value(value) -> tuple[int, bytes]:
    if isinstance(value, str):
        return GGUF_STRING, gguf_string(value)
    if isinstance(value, int):
        return GGUF_UINT32, struct.pack("<I", value)
    if isinstance(value, float):
        return GGUF_FLOAT32, struct.pack("<f", value)
    assert isinstance(value, list)
    kind = gguf_value(value[0])[0]
    return GGUF_ARRAY, struct.pack("<IQ", kind, len(value)) + b"".join(gguf_value(v)[1] for v in value)


def gguf_bytes(metadata: dict, tensors: dict[str, torch.Tensor], magic: bytes = b"GGUF", version: int = 3) -> bytes:
    """A GGUF file written by hand (llama.cpp's layout): header, key/values, tensor infos, F32 data."""
    out = magic + struct.pack("<IQQ", version, len(tensors), len(metadata))
    for key, value in metadata.items():
        kind, data = gguf_value(value)
        out += gguf_string(key) + struct.pack("<I", kind) + data
    offset, blobs = 0, []
    for name, tensor in tensors.items():
        dims = list(reversed(tensor.shape))  # ggml lists the fastest-moving dimension first
        out += gguf_string(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
        out += struct.pack("<IQ", 0, offset)  # type F32
        blob = tensor.to(torch.float32).contiguous().numpy().tobytes()
        blob += b"\x00" * (-len(blob) % 32)
        blobs.append(blob)
        offset += len(blob)
    out += b"\x00" * (-len(out) % 32)
    return out + b"".join(blobs)


GGUF_METADATA = {
    "general.architecture": "llama", "llama.context_length": 64, "llama.embedding_length": 32,
    "llama.block_count": 1, "llama.feed_forward_length": 64, "llama.attention.head_count": 4,
    "llama.attention.head_count_kv": 2, "llama.attention.layer_norm_rms_epsilon": 1e-5,
    "llama.rope.freq_base": 10000.0, "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b", "c", "ab"],
    "tokenizer.ggml.merges": ["a b"], "tokenizer.ggml.eos_token_id": 1,
}
GGUF_TENSORS = {"token_embd.weight": torch.zeros(4, 32)}


def gguf_with(**changes) -> bytes:
    metadata = dict(GGUF_METADATA)
    for key, value in changes.items():
        key = key.replace("__", ".")
        if value is None:
            metadata.pop(key)
        else:
            metadata[key] = value
    return gguf_bytes(metadata, GGUF_TENSORS)


@pytest.fixture(scope="module")
def fuzz_files(artifacts, tmp_path_factory) -> dict[str, Path]:  # noqa: F811  (the imported fixture)
    root = tmp_path_factory.mktemp("fuzz")
    extra = dict(artifacts)
    wide = save_tiny_decoder(root / "wide", dim=48)  # another width: its adapters do not fit artifacts["model"]
    model, _ = minift.load(wide)
    add_lora(model, LoRAConfig(r=2, alpha=4, targets=["q_proj"]))
    extra["wide-lora"] = save_adapter(model, root / "wide-lora")
    extra["sentiment"] = write_jsonl(root / "sentiment.jsonl", SENTIMENT)
    # preference / RL: pairs, prompts and a reward model on the tiny decoder
    model, tokenizer = minift.load(artifacts["model"])
    torch.manual_seed(0)
    extra["reward"] = save_reward_model(RewardModel(model), reward_export_tokenizer(tokenizer), root / "reward")
    extra["pairs"] = write_jsonl(root / "pairs.jsonl", PAIRS)
    extra["prompts"] = write_jsonl(root / "prompts.jsonl", PROMPTS)
    # GGUF out: a Llama with a byte-level BPE vocabulary (llama.cpp has no word-level one); K-quants in
    bpe = bpe_tokenizer()
    extra["bpe"] = minift.save(tiny_llama(bpe.vocab_size, tie=True), bpe, root / "bpe")
    extra["q4k"] = export_gguf(tiny_llama(bpe.vocab_size, tie=False), bpe, root / "q4k.gguf", "q4_k")
    q4k = read_gguf(extra["q4k"]).tensors[Q4K_TENSOR]
    assert q4k.type_name == "Q4_K", q4k.type_name
    Q4K_DATA_START[0] = q4k.offset
    return extra


# ----------------------------------------------------------------------------------------------------
# Imported tables
# ----------------------------------------------------------------------------------------------------


def corrupt_case(name: str):
    def build(e: Env):
        kind, target, named, words = broken_copy(name, e.a, e.tmp)
        return cli_arguments(kind, target, e.a, e.out), [str(named), *words]
    return build


for _name in sorted(CORRUPT_CASES):
    add(f"corrupt/{_name}", corrupt_case(_name))


BASE_TOML = '[data]\ntrain = "tweet-sentiment"\n[train]\noutput_dir = "{out}"\n'


def config_case(override: str):
    def build(e: Env):
        config = e.file("run.toml", BASE_TOML.format(out=e.out))
        return ["finetune", str(config), "--set", override], [f"--set: {override.split('=')[0]} = "]
    return build


for _override, _ in BAD_VALUES:
    add(f"config/{_override}", config_case(_override))


def generate_case(flags: list[str], message: str):
    return lambda e: (["generate", "--model", str(e.a["model"]), *flags], [message])


for _flags, _message in CLI_ERRORS:
    add(f"generate/{' '.join(_flags[2:]) or repr(_flags[1])}", generate_case(_flags, _message))


# ----------------------------------------------------------------------------------------------------
# Data files: finetune, eval and icl read the same records
# ----------------------------------------------------------------------------------------------------

QUICK = ("train.max_steps=1", "train.save_checkpoints=false", "train.export=false")
GOOD_TEXT = "".join(json.dumps({"text": s}) + "\n" for s in SENTENCES[:4])
GOOD_LABELLED = "".join(json.dumps(r) + "\n" for r in SENTIMENT)
CSV_LABELLED = "text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in SENTIMENT)

BAD_DATA = {  # name -> (file name, content, words besides the path; {path} is the file)
    "json-syntax-line-3": ("bad.jsonl", GOOD_TEXT[:-1] + '\n{"text": "the cat\n', ["{path}:5"]),
    "json-array-line": ("bad.jsonl", GOOD_TEXT + '["the cat"]\n', ["{path}:5"]),
    "json-number-line": ("bad.jsonl", '{"text": "the cat"}\n7\n', ["{path}:2"]),
    "json-text-number": ("bad.jsonl", '{"text": "the cat"}\n{"text": 12}\n', ["{path}:2", "text"]),
    "json-text-null": ("bad.jsonl", '{"text": null}\n', ["{path}:1", "text"]),
    "json-text-object": ("bad.jsonl", '{"text": {"a": "b"}}\n', ["{path}:1", "text"]),
    "json-no-text-field": ("bad.jsonl", '{"body": "the cat sat"}\n', ["{path}:1", "text"]),
    "json-empty-file": ("bad.jsonl", "", ["{path}"]),
    "json-blank-lines-only": ("bad.jsonl", "\n\n\n", ["{path}"]),
    "json-not-utf8": ("bad.jsonl", b'{"text": "caf\xe9"}\n', ["{path}"]),
    "json-nul-bytes": ("bad.jsonl", b"\x00" * 64, ["{path}"]),
    "csv-no-text-column": ("bad.csv", "body\nthe cat sat\n", ["{path}", "text"]),
    "csv-header-only": ("bad.csv", "text\n", ["{path}"]),
    "csv-empty": ("bad.csv", "", ["{path}"]),
    "csv-not-utf8": ("bad.csv", b"text\ncaf\xe9 au lait\n", ["{path}"]),
    "unknown-extension": ("bad.parquet", "PAR1", ["{path}"]),
}


def data_finetune_case(file_name: str, content, words: list[str]):
    def build(e: Env):
        data = e.file(file_name, content)
        return (finetune_args(e.a["model"], data, e.out, *QUICK), [w.format(path=data) for w in words])
    return build


def data_eval_case(file_name: str, content, words: list[str]):
    def build(e: Env):
        data = e.file(file_name, content)
        return (["eval", "--model", str(e.a["model"]), "--data", str(data), "--device", "cpu"],
                [w.format(path=data) for w in words])
    return build


for _name, (_file, _content, _words) in BAD_DATA.items():
    add(f"data/finetune-{_name}", data_finetune_case(_file, _content, _words))
    add(f"data/eval-{_name}", data_eval_case(_file, _content, _words))


@case("data/finetune-missing-file")
def _(e):
    return finetune_args(e.a["model"], e.tmp / "nowhere.jsonl", e.out, *QUICK), [str(e.tmp / "nowhere.jsonl")]


@case("data/finetune-directory")
def _(e):
    (e.tmp / "folder.jsonl").mkdir()
    return finetune_args(e.a["model"], e.tmp / "folder.jsonl", e.out, *QUICK), [str(e.tmp / "folder.jsonl")]


@case("data/finetune-classification-label-list")
def _(e):
    data = e.file("labels.jsonl", '{"text": "i love it", "label": "positive"}\n{"text": "meh", "label": ["x"]}\n')
    argv = finetune_args(e.a["task"], data, e.out, "task.kind=classification", *QUICK)
    return argv, [f"{data}:2", "label"]


@case("data/finetune-classification-one-label")
def _(e):
    data = write_jsonl(e.tmp / "labels.jsonl", [{"text": "i love it", "label": "positive"},
                                                 {"text": "so good", "label": "positive"}])
    return finetune_args(e.a["task"], data, e.out, "task.kind=classification", *QUICK), [str(data), "label"]


@case("data/finetune-eval-file-broken")
def _(e):
    data = write_jsonl(e.tmp / "train.jsonl", [{"text": s} for s in SENTENCES])
    held = e.file("held.jsonl", '{"text": "the cat"}\n{"text": \n')
    return finetune_args(e.a["model"], data, e.out, f"data.validation={held}", *QUICK), [f"{held}:2"]


@case("data/finetune-alpaca-missing-output")
def _(e):
    data = e.file("alpaca.jsonl", '{"instruction": "say hi", "input": ""}\n')
    return finetune_args(e.a["model"], data, e.out, "data.format=alpaca", *QUICK), [f"{data}:1", "output"]


@case("data/finetune-chat-role-unknown")
def _(e):
    data = e.file("chat.jsonl", json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}) + "\n")
    return finetune_args(e.a["model"], data, e.out, "data.format=chat", *QUICK), [f"{data}:1", "role"]


@case("data/finetune-chat-messages-string")
def _(e):
    data = e.file("chat.jsonl", json.dumps({"messages": "hello"}) + "\n")
    return finetune_args(e.a["model"], data, e.out, "data.format=chat", *QUICK), [f"{data}:1", "messages"]


@case("data/eval-label-unknown-to-the-head")
def _(e):
    data = e.file("labels.jsonl", GOOD_LABELLED + '{"text": "i love it", "label": "neutral"}\n')
    return (["eval", "--model", str(e.a["task"]), "--data", str(data), "--device", "cpu"],
            [f"{data}:9", "neutral"])


@case("data/eval-label-field-missing")
def _(e):
    return (["eval", "--model", str(e.a["task"]), "--data", str(e.a["sentiment"]), "--label-field", "class",
             "--device", "cpu"], [str(e.a["sentiment"]), "class"])


@case("data/eval-text-not-utf8")
def _(e):
    text = e.file("notes.txt", b"the cat sat on the mat \xff\xfe\n")
    return ["eval", "--model", str(e.a["model"]), "--text", str(text), "--device", "cpu"], [str(text)]


@case("data/eval-text-missing")
def _(e):
    return (["eval", "--model", str(e.a["model"]), "--text", str(e.tmp / "none.txt"), "--device", "cpu"],
            [str(e.tmp / "none.txt")])


@case("data/eval-text-empty")
def _(e):
    text = e.file("empty.txt", "")
    return ["eval", "--model", str(e.a["model"]), "--text", str(text), "--device", "cpu"], [str(text)]


# ----------------------------------------------------------------------------------------------------
# icl: the same records, plus its own flags
# ----------------------------------------------------------------------------------------------------


def icl(e: Env, *flags: str, train: Path | None = None, test: Path | None = None) -> list[str]:
    return ["icl", "--model", str(e.a["model"]), "--train", str(train or e.a["sentiment"]),
            "--test", str(test or e.a["sentiment"]), "--shots", "1", *flags]


def icl_data_case(file_name: str, content, words: list[str], which: str):
    def build(e: Env):
        data = e.file(file_name, content)
        return icl(e, **{which: data}), [w.format(path=data) for w in words]
    return build


ICL_DATA = {
    "json-syntax": ("bad.jsonl", GOOD_LABELLED + '{"text": "x", "label": \n', ["{path}:9"]),
    "no-label-field": ("bad.jsonl", GOOD_TEXT, ["{path}:1", "label"]),
    "label-object": ("bad.jsonl", '{"text": "good", "label": {"a": 1}}\n', ["{path}:1", "label"]),
    "text-empty": ("bad.jsonl", '{"text": "  ", "label": "positive"}\n', ["{path}:1", "text"]),
    "csv-not-utf8": ("bad.csv", b"text,label\ngood \xe9,positive\n", ["{path}"]),
    "csv-no-label-column": ("bad.csv", "text\ngood\n", ["{path}", "label"]),
    "empty": ("bad.jsonl", "", ["{path}"]),
}
for _name, (_file, _content, _words) in ICL_DATA.items():
    add(f"icl/train-{_name}", icl_data_case(_file, _content, _words, "train"))
    add(f"icl/test-{_name}", icl_data_case(_file, _content, _words, "test"))

add("icl/test-label-never-in-train", lambda e: (
    icl(e, test=e.file("test.jsonl", '{"text": "i love it", "label": "neutral"}\n')),
    [f"{e.tmp / 'test.jsonl'}:1", "neutral"]))
add("icl/shots-negative", lambda e: (icl(e, "--shots", "-1"), ["--shots"]))
add("icl/verbalizer-no-equals", lambda e: (icl(e, "--verbalizer", "positive"), ["--verbalizer"]))
add("icl/verbalizer-unknown-label", lambda e: (icl(e, "--verbalizer", "neutral=meh"), ["--verbalizer", "neutral"]))
add("icl/format-without-text", lambda e: (icl(e, "--format", "Review: {label}"), ["--format"]))
add("icl/max-tokens-zero", lambda e: (icl(e, "--max-tokens", "0"), ["--max-tokens"]))
add("icl/max-test-negative", lambda e: (icl(e, "--max-test", "-1"), ["--max-test"]))
add("icl/model-missing", lambda e: (["icl", "--model", str(e.tmp / "none"), "--train", str(e.a["sentiment"]),
                                     "--test", str(e.a["sentiment"])], [str(e.tmp / "none")]))
add("icl/encoder-model", lambda e: (["icl", "--model", str(e.a["task"]), "--train", str(e.a["sentiment"]),
                                     "--test", str(e.a["sentiment"])], ["causal language model"]))


# ----------------------------------------------------------------------------------------------------
# Config files and --set
# ----------------------------------------------------------------------------------------------------


def toml_case(text: str, words: list[str]):
    def build(e: Env):
        config = e.file("run.toml", text.format(out=e.out, model=e.a["model"], data=e.a["data"]))
        return ["finetune", str(config)], [w.format(path=config) for w in words]
    return build


VALID = '[model]\nsource = "{model}"\n[data]\ntrain = "{data}"\n[train]\noutput_dir = "{out}"\nmax_steps = 1\n'
BAD_TOML = {
    "not-toml": ("this is not = = toml\n", ["{path}"]),
    "unclosed-table": ("[train\nlr = 1\n", ["{path}"]),
    "not-utf8": ("", ["{path}"]),  # replaced by bytes below
    "unknown-section": (VALID + "[trainer]\nlr = 1.0\n", ["{path}", "trainer"]),
    "unknown-field": (VALID.replace("max_steps = 1", "max_step = 1"), ["{path}", "train.max_step"]),
    "lr-string": (VALID + 'lr = "fast"\n', ["{path}", "train.lr"]),
    "max-steps-float": (VALID.replace("max_steps = 1", "max_steps = 1.5"), ["{path}", "train.max_steps"]),
    "batch-size-bool": (VALID + "batch_size = true\n", ["{path}", "train.batch_size"]),
    "section-is-value": ('train = 3\n', ["{path}", "train"]),
    "labels-number": (VALID + "[task]\nlabels = 3\n", ["{path}", "task.labels"]),
    "method-unknown": (VALID + '[method]\nname = "magic"\n', ["{path}", "magic"]),
    "method-option-unknown": (VALID + '[method]\nname = "lora"\nrank = 8\n', ["{path}", "rank"]),
    "lora-r-zero": (VALID + '[method]\nname = "lora"\nr = 0\n', ["{path}", "LoRAConfig.r"]),
    "lora-targets-nothing": (VALID + '[method]\nname = "lora"\ntargets = 5\n', ["LoRA targets '5' match no"]),
    "table-twice": (VALID + "[model]\n", ["{path}"]),  # [model] defined twice
}
for _name, (_text, _words) in BAD_TOML.items():
    add(f"toml/{_name}", toml_case(_text, _words))


@case("toml/not-utf8-bytes")
def _(e):
    config = e.file("run.toml", b'[train]\noutput_dir = "caf\xe9"\n')
    return ["finetune", str(config)], [str(config)]


@case("toml/missing-file")
def _(e):
    return ["finetune", str(e.tmp / "none.toml")], [str(e.tmp / "none.toml")]


@case("toml/config-is-a-directory")
def _(e):
    return ["finetune", str(e.tmp)], [str(e.tmp)]


@case("toml/neither-config-nor-resume")
def _(e):
    return ["finetune"], ["CONFIG.toml"]


SET_CASES = {
    "no-equals": ("train.lr", ["train.lr"]),
    "no-section": ("lr=1e-3", ["lr"]),
    "unknown-section": ("trainer.lr=1e-3", ["trainer"]),
    "unknown-field": ("train.learning_rate=1e-3", ["train.learning_rate"]),
    "int-field-text": ("train.max_steps=many", ["train.max_steps"]),
    "float-field-text": ("train.lr=fast", ["train.lr"]),
    "bool-field-text": ("train.export=perhaps", ["train.export"]),
    "method-option": ("method.r=0", ["method.r"]),
    "method-name": ("method.name=magic", ["magic"]),
}
for _name, (_override, _words) in SET_CASES.items():
    add(f"toml/set-{_name}", lambda e, o=_override, w=_words: (
        ["finetune", str(e.file("run.toml", VALID.format(out=e.out, model=e.a["model"], data=e.a["data"]))),
         "--set", o], w))


# ----------------------------------------------------------------------------------------------------
# Model sources: directories, GGUF files, names
# ----------------------------------------------------------------------------------------------------


def source_case(make, words):
    """`make(e) -> source path`; tried with generate (quantize and export use the same loader)."""
    def build(e: Env):
        source = make(e)
        return ["generate", "--model", str(source), "--prompt", PROMPT], [w.format(path=source) for w in words]
    return build


def without(name: str):
    def make(e: Env):
        target = e.copy("model")
        (target / name).unlink()
        return target
    return make


add("model/missing-dir", source_case(lambda e: e.tmp / "nowhere", ["{path}"]))
add("model/empty-dir", source_case(lambda e: (e.tmp / "empty").mkdir() or e.tmp / "empty", ["{path}"]))
add("model/no-config", source_case(without("config.json"), ["{path}"]))
add("model/no-weights", source_case(without("model.safetensors"), ["{path}"]))
add("model/no-tokenizer", source_case(without("tokenizer.json"), ["{path}", "tokenizer"]))
add("model/text-file", source_case(lambda e: e.file("model.txt", "hello"), ["{path}"]))
add("model/unknown-bundled-name", source_case(lambda e: "no-such-model-1b", ["no-such-model-1b"]))
add("model/config-empty", source_case(lambda e: _write(e.copy("model"), "config.json", ""), ["{path}", "config.json"]))
add("model/weights-missing-tensor", source_case(
    lambda e: _drop(e.copy("model") / "model.safetensors", "model.norm.weight"),
    ["{path}", "'norm.weight' is missing"]))
add("model/weights-wrong-shape", source_case(
    lambda e: _reshape(e.copy("model") / "model.safetensors", "model.norm.weight"), ["'norm.weight' has shape (7,)"]))
add("model/unknown-architecture", source_case(
    lambda e: _set_json(e.copy("model") / "config.json", "model_type", "mamba"), ["{path}", "mamba"]))


def _drop(path: Path, name: str) -> Path:
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    tensors.pop(name)
    save_file(tensors, path, metadata={"format": "pt"})
    return path.parent


def _reshape(path: Path, name: str) -> Path:
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    tensors[name] = torch.ones(7)
    save_file(tensors, path, metadata={"format": "pt"})
    return path.parent


def _set_json(path: Path, key: str, value) -> Path:
    data = json.loads(path.read_text())
    data[key] = value
    path.write_text(json.dumps(data))
    return path.parent


GGUF_CASES = {
    "bad-magic": (lambda: b"GGML" + bytes(100), []),
    "two-bytes": (lambda: b"GG", []),
    "empty": (lambda: b"", []),
    "version-99": (lambda: gguf_bytes(GGUF_METADATA, GGUF_TENSORS, version=99), ["99"]),
    "truncated-metadata": (lambda: gguf_with()[:60], []),
    "truncated-tensor-data": (lambda: gguf_with()[:-100], ["token_embd.weight"]),
    "architecture-gpt2": (lambda: gguf_with(general__architecture="gpt2"), ["gpt2"]),
    "architecture-missing": (lambda: gguf_with(general__architecture=None), ["general.architecture"]),
    "embedding-string": (lambda: gguf_with(llama__embedding_length="32"), ["llama.embedding_length"]),
    "heads-zero": (lambda: gguf_with(llama__attention__head_count=0), ["llama.attention.head_count"]),
    "blocks-missing": (lambda: gguf_with(llama__block_count=None), ["llama.block_count"]),
    "kv-heads-not-divisor": (lambda: gguf_with(llama__attention__head_count_kv=3), ["multiple"]),
    "eps-string": (lambda: gguf_with(llama__attention__layer_norm_rms_epsilon="x"),
                   ["llama.attention.layer_norm_rms_epsilon"]),
    "tokens-number": (lambda: gguf_with(tokenizer__ggml__tokens=3), ["tokenizer.ggml.tokens"]),
    "missing-tensors": (lambda: gguf_with(), ["tensor 'blocks.0.attn_norm.weight' is missing"]),
    "merge-not-in-vocabulary": (lambda: gguf_with(tokenizer__ggml__merges=["c d"]), ["tokenizer.ggml.merges[0]"]),
    "merge-one-token": (lambda: gguf_with(tokenizer__ggml__merges=["ab"]), ["tokenizer.ggml.merges[0]"]),
}
for _name, (_make, _words) in GGUF_CASES.items():
    add(f"gguf/generate-{_name}", source_case(lambda e, m=_make: e.file("model.gguf", m()), ["{path}", *_words]))
for _name in ("bad-magic", "truncated-tensor-data", "embedding-string"):
    _make, _words = GGUF_CASES[_name]
    add(f"gguf/quantize-{_name}", lambda e, m=_make, w=_words: (
        ["quantize", "--model", str(e.file("model.gguf", m())), "--out", str(e.out)], [str(e.tmp / "model.gguf"), *w]))
    add(f"gguf/export-{_name}", lambda e, m=_make, w=_words: (
        ["export", "--model", str(e.file("model.gguf", m())), "--out", str(e.out)], [str(e.tmp / "model.gguf"), *w]))


# ----------------------------------------------------------------------------------------------------
# quantize, merge, export: their own inputs and output folders
# ----------------------------------------------------------------------------------------------------

add("quantize/already-4-bit", lambda e: (["quantize", "--model", str(e.a["nf4"]), "--out", str(e.out)],
                                         [str(e.a["nf4"]), "already quantized"]))
add("quantize/model-missing", lambda e: (["quantize", "--model", str(e.tmp / "none"), "--out", str(e.out)],
                                         [str(e.tmp / "none")]))


def merge(e: Env, adapter: Path, out: Path | None = None) -> list[str]:
    return ["merge", "--model", str(e.a["model"]), "--adapter", str(adapter), "--out", str(out or e.out)]


add("adapter/missing", lambda e: (merge(e, e.tmp / "none"), [str(e.tmp / "none")]))
add("adapter/a-file", lambda e: (merge(e, e.file("adapter.safetensors", "x")), [str(e.tmp / "adapter.safetensors")]))
add("adapter/empty-dir", lambda e: (merge(e, e.tmp), [str(e.tmp)]))
add("adapter/no-config", lambda e: (merge(e, _unlink(e.copy("lora"), "adapter_config.json")),
                                    [str(e.tmp / "lora")]))
add("adapter/no-weights", lambda e: (merge(e, _unlink(e.copy("lora"), "adapter_model.safetensors")),
                                     [str(e.tmp / "lora")]))
add("adapter/other-width", lambda e: (merge(e, e.a["wide-lora"]), [str(e.a["wide-lora"]), "shape"]))
add("adapter/config-not-json", lambda e: (merge(e, _write(e.copy("lora"), "adapter_config.json", "{r: 2")),
                                          [str(e.tmp / "lora" / "adapter_config.json")]))
add("adapter/peft-type-unknown", lambda e: (merge(e, _json(e.copy("lora"), "adapter_config.json", "peft_type",
                                                           "ADALORA")), ["ADALORA"]))


def _unlink(folder: Path, name: str) -> Path:
    (folder / name).unlink()
    return folder


def _write(folder: Path, name: str, text: str) -> Path:
    (folder / name).write_text(text)
    return folder


def _json(folder: Path, name: str, key: str, value) -> Path:
    _set_json(folder / name, key, value)
    return folder


def out_cases(command: str, argv: Callable[[Env, Path], list[str]]) -> None:
    """The output folder of `command`: an existing file, a path under a file, a read-only place, its own input."""
    add(f"out/{command}-is-a-file", lambda e: (argv(e, e.file("taken", "x")), [str(e.tmp / "taken")]))
    add(f"out/{command}-under-a-file", lambda e: (argv(e, e.file("taken", "x") / "sub"), [str(e.tmp / "taken")]))
    add(f"out/{command}-in-proc", lambda e: (argv(e, Path("/proc/minift-out")), ["/proc/minift-out"]))


out_cases("quantize", lambda e, out: ["quantize", "--model", str(e.a["model"]), "--out", str(out)])
out_cases("merge", lambda e, out: merge(e, e.a["lora"], out))
out_cases("export-model", lambda e, out: ["export", "--model", str(e.a["model"]), "--out", str(out)])
out_cases("export-run", lambda e, out: ["export", "--run", str(e.a["run"]), "--out", str(out)])
out_cases("finetune", lambda e, out: finetune_args(e.a["model"], e.a["data"], out, *QUICK))
add("out/export-into-its-own-model", lambda e: (
    ["export", "--model", str(e.copy("model")), "--out", str(e.tmp / "model")], [str(e.tmp / "model")]))
add("out/merge-into-its-adapter", lambda e: (merge(e, e.copy("lora"), e.tmp / "lora"), [str(e.tmp / "lora")]))

add("export/run-missing", lambda e: (["export", "--run", str(e.tmp / "none"), "--out", str(e.out)],
                                     [str(e.tmp / "none")]))
add("export/run-without-checkpoints", lambda e: (["export", "--run", str(e.tmp), "--out", str(e.out)], [str(e.tmp)]))
add("export/peft-of-a-full-run", lambda e: (
    ["export", "--run", str(e.a["run"]), "--format", "peft", "--out", str(e.out)], ["--format peft"]))
add("export/peft-with-model", lambda e: (
    ["export", "--model", str(e.a["model"]), "--format", "peft", "--out", str(e.out)], ["--format peft"]))
add("export/adapter-with-run", lambda e: (
    ["export", "--run", str(e.a["run"]), "--adapter", str(e.a["lora"]), "--out", str(e.out)], ["--adapter"]))


# ----------------------------------------------------------------------------------------------------
# Run directories: --resume
# ----------------------------------------------------------------------------------------------------

add("run/resume-missing", lambda e: (["finetune", "--resume", str(e.tmp / "none")], [str(e.tmp / "none")]))
add("run/resume-empty-folder", lambda e: (["finetune", "--resume", str(e.tmp)], [str(e.tmp)]))
add("run/resume-config-broken", lambda e: (
    ["finetune", "--resume", str(_write(e.copy("run"), "config.toml", "[train\n"))],
    [str(e.tmp / "run" / "config.toml")]))
add("run/resume-no-checkpoints", lambda e: (
    ["finetune", "--resume", str(_rmtree(e.copy("run"), "checkpoints"))], [str(e.tmp / "run")]))
add("run/resume-latest-missing-folder", lambda e: (
    ["finetune", "--resume", str(_rmtree(e.copy("run"), "checkpoints/step-000002"))], [str(e.tmp / "run")]))
add("run/resume-changed-method", lambda e: (
    ["finetune", "--resume", str(e.copy("run")), "--set", "method.name=lora"], [str(e.tmp / "run")]))
add("run/start-over-a-finished-run", lambda e: (
    finetune_args(e.a["model"], e.a["data"], e.copy("run"), *QUICK), [str(e.tmp / "run")]))
add("eval/run-missing", lambda e: (["eval", "--run", str(e.tmp / "none"), "--data", str(e.a["data"]),
                                    "--device", "cpu"], [str(e.tmp / "none")]))


def _rmtree(folder: Path, name: str) -> Path:
    shutil.rmtree(folder / name)
    return folder


# ----------------------------------------------------------------------------------------------------
# eval, generate and demo flags
# ----------------------------------------------------------------------------------------------------


def eval_text(e: Env, *flags: str) -> list[str]:
    text = e.file("notes.txt", " ".join(SENTENCES))
    return ["eval", "--model", str(e.a["model"]), "--text", str(text), "--device", "cpu", *flags]


add("eval/max-length-zero", lambda e: (eval_text(e, "--max-length", "0"), ["--max-length"]))
add("eval/stride-zero", lambda e: (eval_text(e, "--stride", "0"), ["--stride"]))
add("eval/stride-negative", lambda e: (eval_text(e, "--stride", "-4"), ["--stride"]))
add("eval/stride-past-max-length", lambda e: (eval_text(e, "--max-length", "8", "--stride", "9"), ["--stride"]))
add("eval/device-unknown", lambda e: (eval_text(e, "--device", "gpu"), ["gpu"]))
add("eval/text-on-a-classifier", lambda e: (
    ["eval", "--model", str(e.a["task"]), "--text", str(e.file("notes.txt", "the cat")), "--device", "cpu"],
    ["--text"]))
add("eval/format-unknown", lambda e: (
    ["eval", "--model", str(e.a["model"]), "--data", str(e.a["data"]), "--format", "yaml"], ["--format"]))
add("generate/encoder", lambda e: (["generate", "--model", str(e.a["task"]), "--prompt", "the cat"],
                                   ["causal LM"]))
add("generate/top-k-past-vocabulary", lambda e: (
    ["generate", "--model", str(e.a["model"]), "--prompt", PROMPT, "--temperature", "1", "--top-k", "-100"],
    ["--top-k"]))
add("generate/temperature-inf", lambda e: (
    ["generate", "--model", str(e.a["model"]), "--prompt", PROMPT, "--temperature", "inf"], ["--temperature"]))
add("generate/max-new-tokens-huge-negative", lambda e: (
    ["generate", "--model", str(e.a["model"]), "--prompt", PROMPT, "--max-new-tokens", "-1000000"],
    ["--max-new-tokens"]))

add("demo/test-size-zero", lambda e: (["demo", "--fast", "--test-size", "0", "--output-dir", str(e.out)],
                                      ["--test-size"]))
add("demo/steps-negative", lambda e: (["demo", "--fast", "--steps", "-1", "--output-dir", str(e.out)], ["--steps"]))
add("demo/shots-negative", lambda e: (["demo", "--fast", "--shots", "-2", "--output-dir", str(e.out)], ["--shots"]))
add("demo/threads-zero", lambda e: (["demo", "--fast", "--threads", "0", "--output-dir", str(e.out)], ["--threads"]))
add("demo/threads-negative", lambda e: (["demo", "--fast", "--threads", "-3", "--output-dir", str(e.out)],
                                        ["--threads"]))
add("demo/output-dir-is-a-file", lambda e: (["demo", "--fast", "--output-dir", str(e.file("taken", "x"))],
                                            [str(e.tmp / "taken")]))
add("demo/chat-max-new-tokens-negative", lambda e: (["demo", "--chat", "--max-new-tokens", "-1"],
                                                    ["--max-new-tokens"]))


# ----------------------------------------------------------------------------------------------------
# Guards: Ctrl-C, the run lock, a full disk, divergence
# ----------------------------------------------------------------------------------------------------


@case("guard/ctrl-c-during-step-3", status=130, prefix="minift: interrupted;")
def _(e):
    ctrl_c_in_step(e.monkeypatch, 3)
    argv = finetune_args(e.a["model"], e.a["data"], e.out, "train.max_steps=6", "train.save_every=2")
    return argv, [str(e.out / "checkpoints" / "step-000003"), f"minift finetune --resume {e.out}"]


@case("guard/ctrl-c-without-checkpoints", status=130, prefix="minift: interrupted;")
def _(e):
    ctrl_c_in_step(e.monkeypatch, 2)
    argv = finetune_args(e.a["model"], e.a["data"], e.out, "train.max_steps=6", "train.save_checkpoints=false")
    return argv, ["no checkpoint was written"]


@case("guard/lock-held-by-a-live-process")
def _(e):
    lock = write_lock(e.out, os.getppid())  # the process that started pytest: alive, and not this one
    return finetune_args(e.a["model"], e.a["data"], e.out, *QUICK), [str(e.out), f"pid {os.getppid()}", str(lock)]


@case("guard/lock-on-resume")
def _(e):
    run = e.copy("run")
    write_lock(run, os.getppid())
    return ["finetune", "--resume", str(run)], [str(run), f"pid {os.getppid()}"]


@case("guard/lock-on-another-host")
def _(e):
    write_lock(e.out, 1, host="another-host")
    return finetune_args(e.a["model"], e.a["data"], e.out, *QUICK), [str(e.out), "another-host"]


@case("guard/disk-full-checkpoint")
def _(e):
    full_disk_when(e.monkeypatch, lambda name: "step-000002" in name)
    argv = finetune_args(e.a["model"], e.a["data"], e.out, "train.max_steps=2", "train.save_every=1")
    second, first = e.out / "checkpoints" / "step-000002", e.out / "checkpoints" / "step-000001"
    return argv, [str(second), "No space left", f"the previous checkpoint {first} is intact"]


@case("guard/disk-full-export")
def _(e):
    full_disk_when(e.monkeypatch, lambda name: f"{os.sep}final{os.sep}" in name)
    argv = finetune_args(e.a["model"], e.a["data"], e.out, "train.max_steps=1")
    return argv, [str(e.out / "final"), "No space left"]


@case("guard/disk-full-quantize")
def _(e):
    full_disk_when(e.monkeypatch, lambda name: str(e.out) in name)
    return ["quantize", "--model", str(e.a["model"]), "--out", str(e.out)], [str(e.out), "No space left"]


@case("guard/disk-full-merge")
def _(e):
    full_disk_when(e.monkeypatch, lambda name: str(e.out) in name)
    return merge(e, e.a["lora"]), [str(e.out), "No space left"]


@case("guard/disk-full-export-run")
def _(e):
    full_disk_when(e.monkeypatch, lambda name: str(e.out) in name)
    return ["export", "--run", str(e.a["run"]), "--out", str(e.out)], [str(e.out), "No space left"]


@case("guard/divergence-lr-1e6")
def _(e):
    argv = finetune_args(e.a["model"], e.a["data"], e.out, "train.max_steps=5", "train.lr=1e6", "train.export=true")
    return argv, ["train.divergence_factor"]


# ----------------------------------------------------------------------------------------------------
# Learning from preferences: [task] kind = reward | preference | grpo | ppo, their records and reward functions
# ----------------------------------------------------------------------------------------------------

PAIRS = [{"prompt": f"the {a} cat", "chosen": f" sat on the {c} mat", "rejected": " sat"}
         for a in ("big", "small", "red") for c in ("blue", "green")]
PROMPTS = [{"prompt": f"the {a} {b}"} for a in ("big", "small", "red") for b in ("cat", "dog")]
GOOD_PAIRS = "".join(json.dumps(r) + "\n" for r in PAIRS)
GOOD_PROMPTS = "".join(json.dumps(r) + "\n" for r in PROMPTS)
REWARD = "tests.test_fuzz:length_reward"


def length_reward(prompts, completions):
    """A reward function for the RL cases: the completion's length in characters."""
    return [float(len(c)) for c in completions]


def too_few_rewards(prompts, completions):
    return [1.0]


def text_rewards(prompts, completions):
    return ["good" for _ in completions]


def nan_rewards(prompts, completions):
    return [float("nan") for _ in completions]


def no_rewards(prompts, completions):
    return None


nothing_callable = 3.0


def pair_args(e: Env, data: Path, kind: str, *sets: str) -> list[str]:
    return finetune_args(e.a["model"], data, e.out, f"task.kind={kind}", "method.name=lora", *QUICK, *sets)


def rl_args(e: Env, data: Path, kind: str, *sets: str, reward: str | None = REWARD) -> list[str]:
    settings = [f"task.kind={kind}", "task.max_new_tokens=2", "task.group_size=2", "train.batch_size=2",
                "method.name=lora", *QUICK]
    if reward is not None:
        settings.append(f"task.reward_function={reward}")
    return finetune_args(e.a["model"], data, e.out, *settings, *sets)


BAD_PAIRS = {  # name -> (file name, content, words; {path} is the file)
    "rejected-missing": ("pairs.jsonl", GOOD_PAIRS + '{"prompt": "the cat", "chosen": " sat"}\n',
                         ["{path}:7", "rejected"]),
    "chosen-blank": ("pairs.jsonl", '{"prompt": "the cat", "chosen": " ", "rejected": " sat"}\n',
                     ["{path}:1", "chosen"]),
    "chosen-equals-rejected": ("pairs.jsonl", GOOD_PAIRS + '{"prompt": "the cat", "chosen": " sat", "rejected": " sat"}\n',
                               ["{path}:7"]),
    "chosen-number": ("pairs.jsonl", '{"prompt": "the cat", "chosen": 3, "rejected": " sat"}\n', ["{path}:1", "chosen"]),
    "rejected-null": ("pairs.jsonl", '{"prompt": "the cat", "chosen": " sat", "rejected": null}\n',
                      ["{path}:1", "rejected"]),
    "prompt-number": ("pairs.jsonl", '{"prompt": 7, "chosen": " sat", "rejected": " mat"}\n', ["{path}:1", "prompt"]),
    "prompt-object": ("pairs.jsonl", '{"prompt": {"a": 1}, "chosen": " sat", "rejected": " mat"}\n',
                      ["{path}:1", "prompt"]),
    "chosen-bad-message-list": ("pairs.jsonl", '{"prompt": "the cat", "chosen": [{"role": "wizard"}], "rejected": " sat"}\n',
                                ["{path}:1", "chosen"]),
    "text-records": ("pairs.jsonl", GOOD_TEXT, ["{path}:1"]),
    "json-syntax": ("pairs.jsonl", GOOD_PAIRS + '{"prompt": "the cat", \n', ["{path}:7"]),
    "array-line": ("pairs.jsonl", GOOD_PAIRS + '["the cat", " sat", " mat"]\n', ["{path}:7"]),
    "empty-file": ("pairs.jsonl", "", ["{path}"]),
    "not-utf8": ("pairs.jsonl", b'{"prompt": "caf\xe9", "chosen": " a", "rejected": " b"}\n', ["{path}"]),
    "csv-no-rejected-column": ("pairs.csv", "prompt,chosen\nthe cat, sat\n", ["{path}", "rejected"]),
}


def pair_data_case(kind: str, file_name: str, content, words: list[str]):
    def build(e: Env):
        data = e.file(file_name, content)
        return pair_args(e, data, kind), [w.format(path=data) for w in words]
    return build


for _name, (_file, _content, _words) in BAD_PAIRS.items():
    add(f"align/preference-{_name}", pair_data_case("preference", _file, _content, _words))
for _name in ("rejected-missing", "chosen-blank", "json-syntax", "csv-no-rejected-column"):  # the reward task's reader
    add(f"align/reward-{_name}", pair_data_case("reward", *BAD_PAIRS[_name]))


@case("align/preference-validation-file-broken")
def _(e):
    held = e.file("held.jsonl", GOOD_PAIRS + '{"prompt": "the cat", "chosen": " sat"}\n')
    return pair_args(e, e.file("pairs.jsonl", GOOD_PAIRS), "preference", f"data.validation={held}"), [f"{held}:7"]


BAD_PROMPTS = {
    "prompt-missing": ("prompts.jsonl", GOOD_PROMPTS + '{"text": "the cat"}\n', ["{path}:7", "prompt"]),
    "prompt-number": ("prompts.jsonl", '{"prompt": 12}\n', ["{path}:1", "prompt"]),
    "prompt-blank": ("prompts.jsonl", '{"prompt": "   "}\n', ["{path}:1", "prompt"]),
    "prompt-messages-without-chat-template": ("prompts.jsonl", '{"prompt": [{"role": "user", "content": "hi"}]}\n',
                                              ["{path}:1", "prompt"]),
    "json-syntax": ("prompts.jsonl", GOOD_PROMPTS + '{"prompt": \n', ["{path}:7"]),
    "empty-file": ("prompts.jsonl", "", ["{path}"]),
    "not-utf8": ("prompts.jsonl", b'{"prompt": "caf\xe9"}\n', ["{path}"]),
    "csv-no-prompt-column": ("prompts.csv", "text\nthe cat\n", ["{path}", "prompt"]),
}


def prompt_data_case(kind: str, file_name: str, content, words: list[str]):
    def build(e: Env):
        data = e.file(file_name, content)
        return rl_args(e, data, kind), [w.format(path=data) for w in words]
    return build


for _name, (_file, _content, _words) in BAD_PROMPTS.items():
    add(f"align/grpo-{_name}", prompt_data_case("grpo", _file, _content, _words))
for _name in ("prompt-missing", "prompt-blank", "json-syntax"):
    _file, _content, _words = BAD_PROMPTS[_name]
    add(f"align/ppo-{_name}", prompt_data_case("ppo", _file, _content, _words))


def rl_option_case(kind: str, words: list[str], *sets: str, reward: str | None = REWARD, model: str = "model"):
    def build(e: Env):
        argv = rl_args(e, e.a["prompts"], kind, *sets, reward=reward)
        argv[argv.index(f"model.source={e.a['model']}")] = f"model.source={e.a[model]}"
        return argv, [w.format(tmp=e.tmp, **{k: str(v) for k, v in e.a.items()}) for w in words]
    return build


REWARD_FUNCTIONS = {  # name -> (task.reward_function, words)
    "module-missing": ("no_such_module_xyz:score", ["task.reward_function", "no_such_module_xyz"]),
    "function-missing": ("tests.test_fuzz:no_such_function", ["task.reward_function", "no_such_function"]),
    "not-callable": ("tests.test_fuzz:nothing_callable", ["task.reward_function", "nothing_callable"]),
    "no-colon": ("tests.test_fuzz", ["task.reward_function"]),
    "no-function-name": ("tests.test_fuzz:", ["task.reward_function"]),
    "returns-one-for-many": ("tests.test_fuzz:too_few_rewards", ["tests.test_fuzz:too_few_rewards"]),
    "returns-text": ("tests.test_fuzz:text_rewards", ["tests.test_fuzz:text_rewards"]),
    "returns-nan": ("tests.test_fuzz:nan_rewards", ["tests.test_fuzz:nan_rewards"]),
    "returns-none": ("tests.test_fuzz:no_rewards", ["tests.test_fuzz:no_rewards"]),
}
for _name, (_spec, _words) in REWARD_FUNCTIONS.items():
    add(f"align/grpo-reward-function-{_name}", rl_option_case("grpo", _words, reward=_spec))
add("align/ppo-reward-function-returns-one-for-many", rl_option_case(
    "ppo", ["tests.test_fuzz:too_few_rewards"], reward="tests.test_fuzz:too_few_rewards"))

RL_OPTIONS = {  # name -> (kind, words, --set values, reward_function or None, model artifact)
    "grpo-no-reward": ("grpo", ["task.reward_model", "task.reward_function"], [], None, "model"),
    "ppo-no-reward": ("ppo", ["task.reward_model", "task.reward_function"], [], None, "model"),
    "grpo-two-rewards": ("grpo", ["task.reward_model", "task.reward_function"], ["task.reward_model={reward}"], REWARD,
                         "model"),
    "grpo-group-size-1": ("grpo", ["task.group_size"], ["task.group_size=1"], REWARD, "model"),
    "grpo-reward-model-missing": ("grpo", ["{tmp}/none"], ["task.reward_model={tmp}/none"], None, "model"),
    "grpo-reward-model-is-a-causal-lm": ("grpo", ["{model}"], ["task.reward_model={model}"], None, "model"),
    "grpo-reward-model-is-a-classifier": ("grpo", ["{task}"], ["task.reward_model={task}"], None, "model"),
    "grpo-reward-model-is-a-file": ("grpo", ["{prompts}"], ["task.reward_model={prompts}"], None, "model"),
    "grpo-encoder": ("grpo", ["lm_head"], [], REWARD, "task"),
    "ppo-encoder": ("ppo", ["lm_head"], [], REWARD, "task"),
    "grpo-ddp-without-torchrun": ("grpo", ["train.distributed"], ["train.distributed=ddp"], REWARD, "model"),
}
for _name, (_kind, _words, _sets, _reward, _model) in RL_OPTIONS.items():
    add(f"align/{_name}", lambda e, k=_kind, w=_words, s=_sets, r=_reward, m=_model: rl_option_case(
        k, w, *[x.format(tmp=e.tmp, **{a: str(v) for a, v in e.a.items()}) for x in s], reward=r, model=m)(e))


@case("align/grpo-reward-model-without-tokenizer")
def _(e):
    reward = e.copy("reward")
    (reward / "tokenizer.json").unlink()
    return rl_args(e, e.a["prompts"], "grpo", f"task.reward_model={reward}", reward=None), [str(reward), "tokenizer"]


@case("align/grpo-reward-model-config-broken")
def _(e):
    reward = e.copy("reward")
    (reward / "config.json").write_text("{")
    return (rl_args(e, e.a["prompts"], "grpo", f"task.reward_model={reward}", reward=None),
            [str(reward / "config.json")])


@case("align/preference-encoder")
def _(e):
    return finetune_args(e.a["task"], e.a["pairs"], e.out, "task.kind=preference", *QUICK), ["lm_head"]


@case("align/reward-encoder")
def _(e):
    return finetune_args(e.a["task"], e.a["pairs"], e.out, "task.kind=reward", *QUICK), ["reward"]


@case("align/preference-ipo-with-label-smoothing")
def _(e):
    return pair_args(e, e.a["pairs"], "preference", "task.loss_type=ipo", "task.label_smoothing=0.1"), [
        "task.loss_type", "task.label_smoothing"]


@case("align/preference-beta-zero")
def _(e):
    return pair_args(e, e.a["pairs"], "preference", "task.beta=0"), ["task.beta"]


@case("align/preference-packing")
def _(e):
    return pair_args(e, e.a["pairs"], "preference", "data.packing=true"), ["data.packing"]


@case("align/grpo-packing")
def _(e):
    return rl_args(e, e.a["prompts"], "grpo", "data.packing=true"), ["data.packing"]


@case("align/resume-with-another-task-kind")
def _(e):
    return ["finetune", "--resume", str(e.copy("run")), "--set", "task.kind=preference"], [str(e.tmp / "run")]


@case("align/preference-max-length-1")
def _(e):
    return pair_args(e, e.a["pairs"], "preference", "data.max_length=1"), ["data.max_length"]


@case("align/preference-data-is-causal-lm-text")
def _(e):
    return pair_args(e, e.a["data"], "preference"), [str(e.a["data"])]


TASK_VALUES = ["task.beta=-1", "task.loss_type=hinge", "task.label_smoothing=0.5", "task.label_smoothing=-0.1",
               "task.center_rewards_coefficient=-1", "task.group_size=0",
               "task.max_new_tokens=0", "task.temperature=0", "task.temperature=-1", "task.top_k=0", "task.top_p=0",
               "task.top_p=1.5", "task.clip_range=0", "task.ppo_epochs=0", "task.num_minibatches=0", "task.gamma=1.5",
               "task.lam=-0.1", "task.vf_coef=-1", "task.clip_range_value=0", "task.target_kl=0", "task.kl_horizon=0",
               "task.kind=dpo", "task.beta=nan", "task.temperature=inf",
               "train.distributed=zero", "train.distributed_timeout=0", "train.distributed_timeout=-5",
               "train.fsdp_param_dtype=int8"]



def quick_config_case(override: str, words: list[str] | None = None):
    """One bad --set on a quick run of the tiny model (a value wrongly accepted trains one step, not SmolLM2)."""
    def build(e: Env):
        return (finetune_args(e.a["model"], e.a["data"], e.out, *QUICK, override),
                words or [f"--set: {override.split('=')[0]} = "])
    return build


for _override in TASK_VALUES:
    add(f"task/{_override}", quick_config_case(_override))
add("task/train.fused_loss=maybe", quick_config_case("train.fused_loss=maybe", ["train.fused_loss"]))
add("task/train.compile=2", quick_config_case("train.compile=2", ["train.compile"]))
add("task/toml-group-size-string", toml_case(VALID + '[task]\nkind = "grpo"\ngroup_size = "four"\n',
                                             ["{path}", "task.group_size"]))
add("task/toml-reward-function-list", toml_case(VALID + '[task]\nkind = "grpo"\nreward_function = ["a:b"]\n',
                                                ["{path}", "task.reward_function"]))


# ----------------------------------------------------------------------------------------------------
# Distributed launch: --nproc and train.distributed, refused before any process starts
# ----------------------------------------------------------------------------------------------------


def nproc_case(n: str, words: list[str], *sets: str):
    return lambda e: ([*finetune_args(e.a["model"], e.a["data"], e.out, *QUICK, *sets), "--nproc", n], words)


add("train/nproc-zero", nproc_case("0", ["--nproc"]))
add("train/nproc-negative", nproc_case("-2", ["--nproc"]))
add("train/nproc-grpo", nproc_case("2", ["train.distributed", "grpo"], "task.kind=grpo", f"task.reward_function={REWARD}"))
add("train/nproc-ppo-ddp", nproc_case("2", ["train.distributed", "ppo"], "task.kind=ppo", "train.distributed=ddp",
                                      f"task.reward_function={REWARD}"))
add("train/nproc-fsdp-qlora", nproc_case("2", ["fsdp", "qlora"], "train.distributed=fsdp", "method.name=qlora"))
add("train/nproc-fsdp-fp16", nproc_case("2", ["fsdp", "fp16"], "train.distributed=fsdp", "train.precision=fp16"))
add("train/nproc-gradual-unfreezing", nproc_case("2", ["train.gradual_unfreezing"], "train.gradual_unfreezing=2"))
add("train/nproc-bad-value", nproc_case("2", ["--set: train.lr = "], "train.lr=-1"))
add("train/nproc-model-missing", lambda e: (
    [*finetune_args(e.tmp / "none", e.a["data"], e.out, *QUICK), "--nproc", "2"], [str(e.tmp / "none")]))
add("train/nproc-data-missing", lambda e: (
    [*finetune_args(e.a["model"], e.tmp / "none.jsonl", e.out, *QUICK), "--nproc", "2"], [str(e.tmp / "none.jsonl")]))
add("train/ddp-without-torchrun", lambda e: (
    finetune_args(e.a["model"], e.a["data"], e.out, *QUICK, "train.distributed=ddp"), ["train.distributed", "torchrun"]))
add("train/fsdp-without-torchrun", lambda e: (
    finetune_args(e.a["model"], e.a["data"], e.out, *QUICK, "train.distributed=fsdp"), ["train.distributed", "torchrun"]))


# ----------------------------------------------------------------------------------------------------
# minift pairs: the policy's samples ranked by a reward model
# ----------------------------------------------------------------------------------------------------


def pairs(e: Env, *flags: str, policy=None, reward=None, prompts=None, out=None) -> list[str]:
    return ["pairs", "--policy", str(policy or e.a["model"]), "--reward", str(reward or e.a["reward"]),
            "--prompts", str(prompts or e.a["prompts"]), "--out", str(out or e.tmp / "pairs.jsonl"),
            "--samples", "2", "--max-new-tokens", "2", *flags]


PAIRS_FLAGS = {"samples-1": (["--samples", "1"], ["--samples"]), "samples-0": (["--samples", "0"], ["--samples"]),
               "max-new-tokens-0": (["--max-new-tokens", "0"], ["--max-new-tokens"]),
               "max-prompts-0": (["--max-prompts", "0"], ["--max-prompts"]),
               "temperature-0": (["--temperature", "0"], ["--temperature"]),
               "temperature-negative": (["--temperature", "-1"], ["--temperature"]),
               "temperature-nan": (["--temperature", "nan"], ["--temperature"]),
               "top-k-negative": (["--top-k", "-5"], ["--top-k"]),
               "split-unknown": (["--prompts", "tweet-prompts", "--split", "dev"], ["dev"])}
for _name, (_flags, _words) in PAIRS_FLAGS.items():
    add(f"pairs/{_name}", lambda e, f=_flags, w=_words: (pairs(e, *f), w))
add("pairs/policy-missing", lambda e: (pairs(e, policy=e.tmp / "none"), [str(e.tmp / "none")]))
add("pairs/reward-missing", lambda e: (pairs(e, reward=e.tmp / "none"), [str(e.tmp / "none")]))
add("pairs/reward-is-a-causal-lm", lambda e: (pairs(e, reward=e.a["model"]), [str(e.a["model"])]))
add("pairs/reward-without-tokenizer", lambda e: (
    pairs(e, reward=_unlink(e.copy("reward"), "tokenizer.json")), [str(e.tmp / "reward"), "tokenizer"]))
add("pairs/prompts-missing", lambda e: (pairs(e, prompts=e.tmp / "none.jsonl"), [str(e.tmp / "none.jsonl")]))
add("pairs/prompts-no-prompt-field", lambda e: (
    pairs(e, prompts=e.file("p.jsonl", GOOD_TEXT)), [f"{e.tmp / 'p.jsonl'}:1", "prompt"]))
add("pairs/prompts-empty-file", lambda e: (pairs(e, prompts=e.file("p.jsonl", "")), [str(e.tmp / "p.jsonl")]))
add("pairs/prompts-unknown-dataset", lambda e: (pairs(e, prompts="tweet-promptz"), ["tweet-promptz"]))
add("pairs/out-folder-missing", lambda e: (pairs(e, out=e.tmp / "no" / "pairs.jsonl"), [str(e.tmp / "no")]))
add("pairs/out-is-a-directory", lambda e: (pairs(e, out=e.tmp), [str(e.tmp)]))
add("pairs/policy-encoder", lambda e: (pairs(e, policy=e.a["task"]), [str(e.a["task"])]))


def _unlink(folder: Path, name: str) -> Path:
    (folder / name).unlink()
    return folder


# ----------------------------------------------------------------------------------------------------
# minift plan: flags and the config it reads (config.json, GGUF header)
# ----------------------------------------------------------------------------------------------------

PLAN_CONFIG = {"model_type": "llama", "vocab_size": 1000, "hidden_size": 64, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128}
PLAN_FLAGS = {
    "gpus-zero": (["--gpus", "0"], ["--gpus"]), "gpus-fraction": (["--gpus", "1.5"], ["--gpus"]),
    "seq-len-zero": (["--seq-len", "0"], ["--seq-len"]), "batch-text": (["--batch", "x"], ["--batch"]),
    "lora-r-zero": (["--lora-r", "0"], ["--lora-r"]), "lora-r-negative": (["--lora-r", "-3"], ["--lora-r"]),
    "gpu-memory-negative": (["--gpu-memory", "-1"], ["--gpu-memory"]),
    "gpu-memory-nan": (["--gpu-memory", "nan"], ["--gpu-memory"]),
    "gpu-memory-inf": (["--gpu-memory", "inf"], ["--gpu-memory"]),
    "method-empty": (["--method", ""], ["--method"]), "method-unknown": (["--method", "dora"], ["--method"]),
    "lora-targets-empty": (["--lora-targets", ""], ["--lora-targets"]),
    "lora-targets-unknown": (["--lora-targets", "q_proj,wq"], ["--lora-targets", "wq"]),
    "format-csv": (["--format", "csv"], ["--format"]), "attention-flash": (["--attention", "flash"], ["--attention"]),
}
for _name, (_flags, _words) in PLAN_FLAGS.items():
    add(f"plan/{_name}", lambda e, f=_flags, w=_words: (["plan", "--model", "7b", *f], w))
add("plan/size-unknown", lambda e: (["plan", "--model", "8b"], ["--model", "8b"]))
add("plan/model-empty", lambda e: (["plan", "--model", ""], ["--model"]))
add("plan/model-missing", lambda e: (["plan", "--model", str(e.tmp / "none")], [str(e.tmp / "none")]))
add("plan/dir-without-config", lambda e: (["plan", "--model", str(e.tmp)], [str(e.tmp)]))


def plan_config_case(change: dict, words: list[str], text: str | None = None):
    def build(e: Env):
        raw = {**PLAN_CONFIG, **change}
        config = e.file("m/config.json", text if text is not None else json.dumps(raw))
        return ["plan", "--model", str(config.parent)], [str(config), *words]
    return build


add("plan/config-not-json", plan_config_case({}, [], text="{"))
add("plan/config-a-list", plan_config_case({}, [], text="[1, 2]"))
add("plan/config-no-hidden-size", lambda e: plan_config_case({}, ["hidden_size"], text=json.dumps(
    {k: v for k, v in PLAN_CONFIG.items() if k != "hidden_size"}))(e))
add("plan/config-heads-zero", plan_config_case({"num_attention_heads": 0}, ["num_attention_heads"]))
add("plan/config-layers-text", plan_config_case({"num_hidden_layers": "2"}, ["num_hidden_layers"]))
add("plan/config-model-type-unknown", plan_config_case({"model_type": "mamba"}, ["mamba"]))
add("plan/config-kv-heads-not-divisor", plan_config_case({"num_key_value_heads": 3}, ["num_key_value_heads"]))
for _name in ("bad-magic", "truncated-metadata", "architecture-gpt2", "heads-zero"):
    _make, _words = GGUF_CASES[_name]
    add(f"plan/gguf-{_name}", lambda e, m=_make, w=_words: (
        ["plan", "--model", str(e.file("model.gguf", m()))], [str(e.tmp / "model.gguf"), *w]))


# ----------------------------------------------------------------------------------------------------
# GGUF out (minift export --format gguf) and K-quant tensors in (truncated or garbled)
# ----------------------------------------------------------------------------------------------------


def gguf_export(e: Env, *flags: str, model=None, out=None) -> list[str]:
    return ["export", "--model", str(model or e.a["bpe"]), "--format", "gguf", "--out", str(out or e.tmp / "m.gguf"),
            *flags]


def other_model(e: Env, **config) -> Path:
    from minift.config import ModelConfig
    from tests.test_gguf_write import bpe_tokenizer

    tokenizer = bpe_tokenizer()
    base = dict(vocab_size=tokenizer.vocab_size, dim=32, n_layers=1, n_heads=4, hidden_dim=64)
    return minift.save(minift.Transformer(ModelConfig(**{**base, **config})), tokenizer, e.tmp / "other")


add("export/gguf-out-not-gguf", lambda e: (gguf_export(e, out=e.tmp / "m.bin"), [str(e.tmp / "m.bin"), "*.gguf"]))
add("export/gguf-out-folder-missing", lambda e: (gguf_export(e, out=e.tmp / "no" / "m.gguf"), [str(e.tmp / "no")]))
add("export/gguf-out-is-a-directory", lambda e: (
    gguf_export(e, out=(e.tmp / "d.gguf").mkdir() or e.tmp / "d.gguf"), [str(e.tmp / "d.gguf")]))
add("export/gguf-word-tokenizer", lambda e: (gguf_export(e, model=e.a["model"]), ["WordLevel"]))
add("export/gguf-run-word-tokenizer", lambda e: (
    ["export", "--run", str(e.a["run"]), "--format", "gguf", "--out", str(e.tmp / "m.gguf")], ["WordLevel"]))
add("export/gguf-encoder", lambda e: (gguf_export(e, model=e.a["task"]), ["model_type"]))
add("export/gguf-sliding-window", lambda e: (
    gguf_export(e, model=other_model(e, model_type="mistral", n_kv_heads=2, sliding_window=8)), ["sliding_window"]))
add("export/gguf-gpt2", lambda e: (gguf_export(e, model=other_model(
    e, model_type="gpt2", norm="layer", positions="learned", mlp="gelu", activation="gelu_tanh", qkv_bias=True,
    out_bias=True, mlp_bias=True)), ["gpt2"]))
add("export/gguf-gemma-untied", lambda e: (gguf_export(e, model=other_model(
    e, model_type="gemma", norm_plus_one=True, embed_scale=True, activation="gelu_tanh")), ["gemma", "tie_embeddings"]))
add("export/gguf-gemma2-query-scalar", lambda e: (gguf_export(e, model=other_model(
    e, model_type="gemma2", norm_plus_one=True, embed_scale=True, activation="gelu_tanh", tie_embeddings=True,
    branch_post_norms=True, query_pre_attn_scalar=5.0)), ["query_pre_attn_scalar"]))
add("export/gguf-phi3-longrope", lambda e: (gguf_export(e, model=other_model(
    e, model_type="phi3", fused_qkv=True, fused_gate_up=True, max_seq_len=128, rope_scaling={
        "rope_type": "longrope", "long_factor": [1.0] * 4, "short_factor": [1.0] * 4,
        "original_max_position_embeddings": 64})), ["LongRoPE"]))
add("export/gguf-adapter-of-another-width", lambda e: (
    gguf_export(e, "--adapter", str(e.a["wide-lora"])), [str(e.a["wide-lora"])]))
add("export/quant-without-gguf", lambda e: (
    ["export", "--model", str(e.a["bpe"]), "--quant", "q4_k", "--out", str(e.out)], ["--quant"]))
add("export/gguf-with-dtype", lambda e: (gguf_export(e, "--dtype", "bfloat16"), ["--dtype"]))
add("export/gguf-peft-run-quant", lambda e: (
    ["export", "--run", str(e.a["run"]), "--format", "peft", "--quant", "q8_0", "--out", str(e.out)], ["--format peft"]))


def kquant_file(e: Env, change) -> Path:
    """The Q4_K export of the tiny BPE model with one tensor info (or the file) changed by `change(data, at)`, where
    `at` is the offset of the Q4_K tensor's name in the header."""
    data = bytearray(e.a["q4k"].read_bytes())
    at = bytes(data).index(gguf_string(Q4K_TENSOR))
    data = change(data, at)
    return e.file("k.gguf", bytes(data))


Q4K_TENSOR = "blk.1.ffn_down.weight"  # 256 columns: stored as Q4_K by --quant q4_k


def info(at: int, field: str) -> int:
    """Offset of n_dims / dims[0] / type / offset in the tensor info that starts at `at` (2 dims)."""
    start = at + len(gguf_string(Q4K_TENSOR))
    return {"n_dims": start, "dim0": start + 4, "dim1": start + 12, "type": start + 20, "offset": start + 24}[field]


def put(fmt: str, field: str, value):
    def change(data: bytearray, at: int) -> bytearray:
        struct.pack_into(fmt, data, info(at, field), value)
        return data
    return change


def cut_inside(data: bytearray, at: int) -> bytearray:
    return data[: Q4K_DATA_START[0] + 100]


Q4K_DATA_START = [0]  # where the Q4_K tensor's bytes start in the file, set by the fixture

KQUANT_CASES = {
    "truncated-in-q4k-tensor": (cut_inside, [Q4K_TENSOR, "Q4_K"]),
    "type-changed-to-q6k": (put("<I", "type", 14), [Q4K_TENSOR]),
    "type-unknown-99": (put("<I", "type", 99), [Q4K_TENSOR, "99"]),
    "type-iq2-xxs": (put("<I", "type", 16), [Q4K_TENSOR, "IQ2_XXS"]),
    "row-not-a-whole-super-block": (put("<Q", "dim0", 250), [Q4K_TENSOR]),
    "offset-past-the-end": (put("<Q", "offset", 1 << 40), [Q4K_TENSOR]),
    "offset-unaligned": (put("<Q", "offset", 3), [Q4K_TENSOR]),
    "n-dims-5": (put("<I", "n_dims", 5), []),
    "dim-zero": (put("<Q", "dim1", 0), [Q4K_TENSOR]),
}
for _arch in ("gemma", "gemma2", "gemma3", "phi3"):  # GGUF files of families minift reads only from config.json
    add(f"gguf/architecture-{_arch}", source_case(
        lambda e, a=_arch: e.file("model.gguf", gguf_with(general__architecture=a)), ["{path}", _arch]))
add("gguf/architecture-qwen3-without-its-keys", source_case(
    lambda e: e.file("model.gguf", gguf_with(general__architecture="qwen3")), ["{path}", "qwen3."]))
for _name, (_change, _words) in KQUANT_CASES.items():
    add(f"gguf/kquant-{_name}", lambda e, c=_change, w=_words: (
        ["generate", "--model", str(kquant_file(e, c)), "--prompt", "the cat"], [str(e.tmp / "k.gguf"), *w]))


# ----------------------------------------------------------------------------------------------------
# config.json of the newer families: Gemma 1/2/3, Phi-3 (LongRoPE), Mistral/Qwen sliding windows
# ----------------------------------------------------------------------------------------------------

FAMILY_BASE = {"vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
               "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16}
PHI3_BASE = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2}  # as tests/test_phi3.py's BAD_CONFIGS expect
LONGROPE_OK = {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
               "original_max_position_embeddings": 16}
FAMILY_CASES = [(f"gemma-{i}", t, x, [m]) for i, (t, x, m) in enumerate(GEMMA_BAD_CONFIGS)] + [
    (f"phi3-{i}", "phi3", x, [m]) for i, (x, m) in enumerate(PHI3_BAD_CONFIGS)] + [
    ("mistral-window-zero", "mistral", {"sliding_window": 0}, ["sliding_window"]),
    ("mistral-window-negative", "mistral", {"sliding_window": -4}, ["sliding_window"]),
    ("mistral-window-float", "mistral", {"sliding_window": 4.5}, ["sliding_window"]),
    ("qwen2-layer-type-unknown", "qwen2", {"use_sliding_window": True, "sliding_window": 4,
                                           "layer_types": ["chunked_attention", "full_attention"]}, ["layer_types"]),
    ("qwen3-max-window-layers-text", "qwen3", {"use_sliding_window": True, "sliding_window": 4,
                                               "max_window_layers": "one"}, ["max_window_layers"]),
    ("qwen3-use-sliding-window-text", "qwen3", {"use_sliding_window": "yes", "sliding_window": 4},
     ["use_sliding_window"]),
    ("gemma2-query-pre-attn-scalar-zero", "gemma2", {"query_pre_attn_scalar": 0}, ["query_pre_attn_scalar"]),
    ("gemma2-final-softcap-negative", "gemma2", {"final_logit_softcapping": -1.0}, ["final_logit_softcapping"]),
    ("gemma3-local-base-text", "gemma3_text", {"rope_local_base_freq": "x"}, ["rope_local_base_freq"]),
    ("gemma3-pattern-zero", "gemma3_text", {"sliding_window_pattern": 0}, ["sliding_window_pattern"]),
    ("gemma-head-dim-zero", "gemma", {"head_dim": 0}, ["head_dim"]),
    ("phi3-rope-scaling-list", "phi3", {"rope_scaling": [1, 2]}, ["rope_scaling"]),
    ("phi3-longrope-original-zero", "phi3", {"rope_scaling": LONGROPE_OK, "original_max_position_embeddings": 0},
     ["original_max_position_embeddings"]),
    ("phi3-longrope-factor-text", "phi3", {"rope_scaling": {**LONGROPE_OK, "long_factor": ["2"] * 8}},
     ["long_factor"]),
    ("phi3-partial-rotary-zero", "phi3", {"partial_rotary_factor": 0}, ["partial_rotary_factor"]),
]


def family_case(model_type: str, extra: dict, words: list[str]):
    def build(e: Env):
        base = PHI3_BASE if model_type == "phi3" else FAMILY_BASE
        config = e.file("m/config.json", json.dumps({"model_type": model_type, **base, **extra}))
        return ["generate", "--model", str(config.parent), "--prompt", "hi"], [str(config), *words]
    return build


for _name, _type, _extra, _words in FAMILY_CASES:
    add(f"family/{_name}", family_case(_type, _extra, _words))


# ----------------------------------------------------------------------------------------------------
# The test
# ----------------------------------------------------------------------------------------------------


def outcome(status, lines: list[str], expected: Case, words: list[str]) -> str:
    if status == 0:
        return "silent"
    if status == expected.status and len(lines) == 1 and lines[0].startswith(expected.prefix) and all(
            w in lines[0] for w in words):
        return "clean"
    return "unclear"


@pytest.fixture
def python_sigint():
    """Python's own SIGINT handler while a case runs (a background job may have SIGINT ignored)."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before if before is not None else signal.default_int_handler)


# Cases that still fail, in code another helper is writing: strict xfails (an xpass is a failure), reason = the defect.
KNOWN: dict[str, str] = {}


def table_params():
    return [pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=KNOWN[name])) if name in KNOWN else name
            for name in TABLE]


@pytest.mark.parametrize("name", table_params())
def test_fuzz(name, fuzz_files, tmp_path, monkeypatch, capsys, record_property, python_sigint):
    expected = TABLE[name]
    argv, words = expected.build(Env(fuzz_files, tmp_path, monkeypatch))
    capsys.readouterr()
    try:
        status = main(argv)
    except BaseException as error:  # SystemExit (argparse), KeyboardInterrupt and every traceback a user would see
        record_property("outcome", "crash")
        raise AssertionError(f"{name}: main raised {type(error).__name__}: {error}") from error
    lines = capsys.readouterr().err.strip().splitlines()
    record_property("outcome", outcome(status, lines, expected, words))
    assert status == expected.status, (status, lines)
    assert len(lines) == 1 and lines[0].startswith(expected.prefix), lines
    for word in words:
        assert word in lines[0], (word, lines[0])


def test_the_table_is_large_enough():
    assert len(TABLE) >= 150
    kinds = {name.split("/")[0] for name in TABLE}
    assert {"corrupt", "config", "generate", "data", "icl", "toml", "gguf", "model", "adapter", "run", "out",
            "quantize", "export", "eval", "demo", "guard"} <= kinds

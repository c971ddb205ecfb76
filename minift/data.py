"""Data for fine-tuning: records -> token ids + labels -> padded or packed batches.

Lesson
------
A record is one JSON object (a JSONL line) or one CSV row. Its fields decide the format:

    format              fields                          what the model learns (label != -100)
    -----------------   -----------------------------   -------------------------------------
    text                text                            every token, then EOS
    prompt_completion   prompt, completion              the completion, then EOS
    alpaca              instruction, input?, output     the output, then EOS (prompt: REFERENCE.md)
    chat                messages [{role, content}]      the assistant turns only
    classification      text, label                     one class id per example (a head, not the LM)
    mlm                 text                            masked tokens (chosen later by losses.mask_tokens)

Prompt and completion are tokenized separately and concatenated, so the prompt tokens are exactly those
the model will see at inference. EOS is appended to every target and *trained* (its label is the EOS id),
even when the pad token is the EOS token: padding is recognised by position (collate labels pads with
-100), never by comparing ids with pad_id. Mask pads by id and the model never learns to stop.

Batches. `collate` pads to the longest example (labels with -100, attention_mask 0). Grouping examples of
similar length (`LengthGroupedSampler`) wastes less padding; its order is a pure function of (seed, epoch),
and its state (epoch, index) lets a resumed run continue with the very next batch.

Packing. Instead of padding, place several examples in one row of max_length tokens (best-fit decreasing:
longest first, each into the fullest row it still fits). Two things keep a packed row equal to separate rows:

    tokens        a1 a2 a3 b1 b2 c1 c2 c3 c4        attention (causal, block-diagonal)
    position_ids  0  1  2  0  1  0  1  2  3           a: sees a only  (■ = may attend)
    seq_ids       1  1  1  2  2  3  3  3  3           b: sees b only, from position 0 again

* attention must not cross examples: otherwise b's tokens are predicted from a's text, a context that
  does not exist at inference, and the loss (and the gradient) is not that of the unpacked examples;
* positions restart at 0 so each example is encoded as if it began the sequence, as it will in use.
The first label of each example is set to -100: in a packed row it would be "predicted" by the previous
example's last token, a target that an unpacked example never has.
"""

from __future__ import annotations

import bisect
import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Sampler

from minift.losses import IGNORE_INDEX

FORMATS = ("text", "prompt_completion", "alpaca", "chat", "classification", "mlm")

ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)

# ----------------------------------------------------------------------------------------------------
# Reading records
# ----------------------------------------------------------------------------------------------------


class Record(dict):
    """A dict that remembers where it came from (`where` = "file:line"), for error messages."""

    def __init__(self, fields: dict, where: str = "record") -> None:
        super().__init__(fields)
        self.where = where


def _read_jsonl(path: Path, file) -> list[Record]:
    records = []
    for line_number, line in enumerate(file, start=1):
        if not line.strip():
            continue
        where = f"{path}:{line_number}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: malformed JSON ({error.msg} at column {error.colno}); "
                             "each line must hold one complete JSON object") from None
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a JSON object like {{\"text\": ...}}, got {type(value).__name__}")
        records.append(Record(value, where))
    return records


def _read_csv(path: Path, file, delimiter: str) -> list[Record]:
    records = []
    reader = csv.DictReader(file, delimiter=delimiter)
    for row in reader:
        where = f"{path}:{reader.line_num}"
        if None in row:
            raise ValueError(f"{where}: more values than the {len(reader.fieldnames)} header columns; "
                             "quote fields that contain the delimiter")
        missing = [name for name, value in row.items() if value is None]
        if missing:
            raise ValueError(f"{where}: missing value for column(s) {missing}")
        records.append(Record(row, where))
    return records


def read_records(path: str | Path) -> list[Record]:
    """Read a .jsonl (one JSON object per line; blank lines skipped) or .csv/.tsv (header row) file.

    The one record reader of minift: fine-tuning data and `minift icl` files both come through here. The
    rules: UTF-8 (a byte-order mark, as Excel writes, is skipped; bytes that are not UTF-8 are an error,
    never decoded by a guess), every error names file:line, every record remembers it in `record.where`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".csv", ".tsv"):
        raise ValueError(f"{path}: unsupported file type {suffix!r}; use .jsonl (one JSON object per line) or .csv")
    try:
        with path.open(encoding="utf-8-sig", newline="") as file:
            if suffix == ".jsonl":
                records = _read_jsonl(path, file)
            else:
                records = _read_csv(path, file, delimiter="\t" if suffix == ".tsv" else ",")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not valid UTF-8 (byte {error.object[error.start]:#x} at offset {error.start}); "
                         "re-save the file as UTF-8") from None
    if not records:
        raise ValueError(f"{path}: empty dataset (no records); expected at least one line or row")
    return records


def require_fields(record: dict, fields: Sequence[str], where: str | None = None) -> None:
    """Raise a ValueError naming the first missing or non-string field and the place of the record."""
    where = where or getattr(record, "where", "record")
    for name in fields:
        if name not in record:
            raise ValueError(f"{where}: missing field {name!r} (record has {sorted(record)})")
        if not isinstance(record[name], str):
            raise ValueError(f"{where}: field {name!r} must be a string, got {type(record[name]).__name__}")


TASK_FORMATS = {  # the formats each task kind reads; classification and mlm are the only ones of their tasks
    "causal_lm": ("text", "prompt_completion", "alpaca", "chat"),
    "masked_lm": ("mlm",),
    "classification": ("classification",),
}


def detect_format(record: dict, task: str | None = None) -> str:
    """Guess the format from the fields present (see the table in the module docstring).

    `task` (a task kind) narrows the guess to the formats that task reads: a text + label record is
    "classification" for a classifier (or with no task), but plain "text" for a causal LM, whose perplexity
    ignores the label, and "mlm" for a masked LM. A record the task cannot read is a ValueError naming
    what is missing, e.g. "a classification model needs a label field".
    """
    if task is not None and task not in TASK_FORMATS:
        raise ValueError(f"unknown task kind {task!r}; expected one of {', '.join(TASK_FORMATS)}")
    where = getattr(record, "where", "record")
    if task in ("masked_lm", "classification"):
        check_task_fields(record, "mlm" if task == "masked_lm" else "classification", where)
        return TASK_FORMATS[task][0]
    if "messages" in record:
        return "chat"
    if "instruction" in record:
        return "alpaca"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    if "text" in record:
        return "classification" if "label" in record and task is None else "text"
    raise ValueError(f"{where}: cannot tell the format from fields {sorted(record)}; expected one of: text; "
                     "prompt + completion; instruction + input + output; messages"
                     + ("" if task == "causal_lm" else "; text + label"))


def check_task_fields(record: dict, fmt: str, where: str | None = None) -> None:
    """Raise a ValueError saying which field a format needs and what the record looks like instead.

    Only presence is checked here (tokenize_example checks types): a missing 'text' for mlm or
    classification, a missing 'label' for classification, a missing field of a causal LM format, each with
    a hint when the fields fit another format (say alpaca records read with format text).
    """
    where = where or getattr(record, "where", "record")
    needed = {"text": ["text"], "prompt_completion": ["prompt", "completion"], "alpaca": ["instruction", "output"],
              "chat": ["messages"], "classification": ["text", "label"], "mlm": ["text"]}.get(fmt, [])
    missing = [name for name in needed if name not in record]
    if not missing:
        return
    try:
        looks_like = detect_format(record, "causal_lm")
    except ValueError:
        looks_like = None
    hint = f"; the fields look like {looks_like} records" if looks_like and looks_like != fmt else ""
    has = f"(record has {sorted(record)})"
    if fmt == "classification":
        what = " and ".join({"text": "a text field 'text'", "label": "a label field 'label'"}[name] for name in missing)
        raise ValueError(f"{where}: a classification model needs {what} {has}{hint}; name the fields with "
                         "--text-field / --label-field (data.text_field / data.label_field in a config)")
    if fmt == "mlm":
        raise ValueError(f"{where}: a masked-LM model reads plain text from a field 'text' {has}{hint}; name the "
                         "field with --text-field (data.text_field in a config)")
    fix = f": set the format to {looks_like} (--format, or data.format in a config)" if hint else ""
    raise ValueError(f"{where}: missing field {missing[0]!r} (format {fmt} needs {needed}; record has "
                     f"{sorted(record)}){hint}{fix}")


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """Stanford Alpaca's prompt, with or without the input section (the response follows "### Response:")."""
    if input:
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


def label_names(records: Sequence[dict], field: str = "label") -> list[str]:
    """The sorted distinct labels of a classification dataset; a label's id is its index here."""
    for record in records:
        if field not in record:
            if field == "label":
                check_task_fields(record, "classification")  # the same message tokenize_example gives
            raise ValueError(f"{getattr(record, 'where', 'record')}: a classification model needs a label field "
                             f"{field!r} (record has {sorted(record)}); name it with --label-field "
                             "(data.label_field in a config)")
    return sorted({label_text(record[field], getattr(record, "where", "record"), field) for record in records})


def label_text(value, where: str, field: str = "label") -> str:
    """A record's label as the name it is known by: a string, or a number or true/false written as text.
    A list, an object or null is an error naming the record (file:line): it names no single class."""
    if value is None or isinstance(value, (list, dict)):
        shown = "null" if value is None else f"a {'list' if isinstance(value, list) else 'JSON object'} " \
                                             f"({json.dumps(value)[:60]})"
        raise ValueError(f"{where}: field {field!r} is {shown}; a label must be one class name, a string or a number")
    return str(value)


# ----------------------------------------------------------------------------------------------------
# Tokenizing one example
# ----------------------------------------------------------------------------------------------------


def _chat_segments(record: dict, tokenizer, where: str) -> list[tuple[list[int], bool]]:
    """(token ids, trained?) pieces of a conversation: the assistant turns are trained, the rest is prompt.

    For each assistant turn, render the conversation before it with the generation prompt (what the model
    sees at inference) and the conversation including it; the difference is the turn the model must write.
    Each piece is encoded on its own, so the prompt tokens equal the inference-time ones.
    """
    messages = record["messages"]
    if isinstance(messages, str):
        raise ValueError(f"{where}: field 'messages' is a string, not a list of {{role, content}} objects; a CSV "
                         "cell holds only text, so write chat records as JSONL")
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} objects")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"{where}: messages[{index}] must be an object with 'role' and 'content'")
        if message["role"] not in ("system", "user", "assistant"):
            raise ValueError(f"{where}: messages[{index}] has role {message['role']!r}; "
                             "expected system, user or assistant")
    if not any(message["role"] == "assistant" for message in messages):
        raise ValueError(f"{where}: no assistant message, so nothing to learn")
    if messages[0]["role"] == "assistant":
        raise ValueError(f"{where}: the conversation starts with an assistant message; add the user (or system) "
                         "message it answers")

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False) if text else []

    segments, done = [], ""
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:index], add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages[: index + 1], add_generation_prompt=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise ValueError(f"{where}: the chat template does not render turn by turn (an earlier rendering is "
                             "not a prefix of a later one), so assistant tokens cannot be located")
        segments += [(encode(prompt[len(done):]), False), (encode(full[len(prompt):]), True)]
        done = full
    if tokenizer.eos_token_id not in segments[-1][0]:
        segments.append(([tokenizer.eos_token_id], True))  # the template ends turns without EOS: teach stopping
    rest = tokenizer.apply_chat_template(messages, add_generation_prompt=False)[len(done):]
    segments.append((encode(rest), False))
    return segments


def tokenize_example(record: dict, tokenizer, fmt: str | None = None, max_length: int | None = None,
                     classes: Sequence[str] | None = None, add_bos: bool | None = None) -> dict:
    """Tokenize one record -> {"input_ids", "labels", "n_truncated"} (lists of ints; labels -100 = no loss).

    fmt: one of FORMATS, or None to detect it. For "classification" the result has "label" (an int: the
    index of the record's label in `classes`, see `label_names`) instead of "labels"; for "mlm" only
    input_ids (mask later with losses.mask_tokens). Both encode with the tokenizer's special tokens
    ([CLS] ... [SEP] for BERT). Language-model formats append EOS (trained) and prepend BOS (not trained)
    when add_bos is True (default: the tokenizer's `add_bos_token` attribute if it has one, else False).
    Sequences longer than max_length are cut at the end; "n_truncated" counts the tokens cut.
    """
    where = getattr(record, "where", "record")
    fmt = fmt or detect_format(record)
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    check_task_fields(record, fmt, where)

    def cut(ids: list[int]) -> tuple[list[int], int]:
        if max_length is None or len(ids) <= max_length:
            return ids, 0
        return ids[:max_length], len(ids) - max_length

    if fmt in ("classification", "mlm"):
        require_fields(record, ["text"], where)
        ids, n_cut = cut(tokenizer.encode(record["text"], add_special_tokens=True))
        if fmt == "mlm":
            return {"input_ids": ids, "n_truncated": n_cut}
        if "label" not in record:
            raise ValueError(f"{where}: missing field 'label'")
        if classes is None:
            raise ValueError("tokenize_example: classification needs classes=[...] (see data.label_names)")
        name = label_text(record["label"], where)
        if name not in classes:
            raise ValueError(f"{where}: label {name!r} is not one of {list(classes)}")
        return {"input_ids": ids, "label": list(classes).index(name), "n_truncated": n_cut}

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("tokenize_example: the tokenizer has no EOS token; set one so the model learns to stop")
    if fmt == "chat":
        segments = _chat_segments(record, tokenizer, where)
    else:
        if fmt == "text":
            require_fields(record, ["text"], where)
            prompt, target = "", record["text"]
        elif fmt == "prompt_completion":
            require_fields(record, ["prompt", "completion"], where)
            prompt, target = record["prompt"], record["completion"]
        else:  # alpaca
            require_fields(record, ["instruction", "output"], where)
            if record.get("input") is not None:
                require_fields(record, ["input"], where)
            prompt, target = alpaca_prompt(record["instruction"], record.get("input") or ""), record["output"]
        segments = [(encode(prompt) if prompt else [], False), (encode(target) + [eos], True)]
        if add_bos if add_bos is not None else getattr(tokenizer, "add_bos_token", False):
            segments.insert(0, ([tokenizer.bos_token_id], False))

    input_ids = [token for ids, _ in segments for token in ids]
    targets = [token if trained else IGNORE_INDEX for ids, trained in segments for token in ids]
    input_ids, n_cut = cut(input_ids)
    return {"input_ids": input_ids, "labels": targets[: len(input_ids)], "n_truncated": n_cut}


@dataclass
class TokenizeReport:
    """What tokenize_records did: how many examples, how many were cut and by how many tokens in all."""

    examples: int = 0
    truncated_examples: int = 0
    truncated_tokens: int = 0
    dropped_no_targets: int = 0  # truncation left no trained token: the example teaches nothing, so it is dropped

    def __str__(self) -> str:
        return (f"{self.examples} examples, {self.truncated_examples} truncated ({self.truncated_tokens} tokens cut), "
                f"{self.dropped_no_targets} dropped (no target left)")


def tokenize_records(
    records: Sequence[dict], tokenizer, fmt: str | None = None, max_length: int | None = None,
    classes: Sequence[str] | None = None, add_bos: bool | None = None,
) -> tuple[list[dict], TokenizeReport]:
    """tokenize_example over a dataset (the format is detected from the first record when fmt is None).

    For classification without `classes`, the sorted label names of these records are used; pass the
    training set's names explicitly when tokenizing validation or test data.
    """
    if not records:
        raise ValueError("tokenize_records: empty dataset")
    fmt = fmt or detect_format(records[0])
    if fmt == "classification" and classes is None:
        classes = label_names(records)
    examples, report = [], TokenizeReport()
    for record in records:
        example = tokenize_example(record, tokenizer, fmt, max_length, classes, add_bos)
        if example["n_truncated"]:
            report.truncated_examples += 1
            report.truncated_tokens += example["n_truncated"]
        if "labels" in example and all(label == IGNORE_INDEX for label in example["labels"][1:]):
            report.dropped_no_targets += 1
            continue
        examples.append(example)
    report.examples = len(examples)
    return examples, report


# ----------------------------------------------------------------------------------------------------
# Padded batches and the length-grouped sampler
# ----------------------------------------------------------------------------------------------------


def collate(examples: Sequence[dict], pad_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad to the longest example -> input_ids (B, T), attention_mask (B, T), labels (B, T) or (B,).

    Padded label positions are -100 by position, so an EOS target survives even when pad_id == eos id.
    Use padding_side="left" for batched generation of causal LMs, "right" for training.
    """
    if padding_side not in ("right", "left"):
        raise ValueError(f"collate: padding_side must be 'right' or 'left', got {padding_side!r}")
    if not examples:
        raise ValueError("collate: no examples")
    T = max(len(example["input_ids"]) for example in examples)
    B = len(examples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros(B, T, dtype=torch.long)  # (B, T)
    token_labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        span = slice(0, n) if padding_side == "right" else slice(T - n, T)
        input_ids[row, span] = torch.tensor(example["input_ids"], dtype=torch.long)
        attention_mask[row, span] = 1
        if "labels" in example:
            token_labels[row, span] = torch.tensor(example["labels"], dtype=torch.long)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if "label" in examples[0]:
        batch["labels"] = torch.tensor([example["label"] for example in examples], dtype=torch.long)  # (B,)
    elif "labels" in examples[0]:
        batch["labels"] = token_labels
    return batch


class LengthGroupedSampler(Sampler):
    """Seeded batches of example indices, similar lengths together; resumable at any batch.

    Per epoch: shuffle all indices with a generator seeded by (seed, epoch); cut into mega-batches of
    `mega_batch_factor` batches; sort each mega-batch by length (longest first); cut into batches; shuffle
    the batch order. group_by_length=False gives plain shuffled batches. The state is (epoch, index):
    the epoch in progress and how many of its batches were handed out.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0, group_by_length: bool = True,
                 mega_batch_factor: int = 50, drop_last: bool = False) -> None:
        if batch_size < 1 or not lengths:
            raise ValueError(f"LengthGroupedSampler: need batch_size >= 1 and examples; "
                             f"got batch_size={batch_size}, {len(lengths)} examples")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.group_by_length = group_by_length
        self.mega_batch_factor = mega_batch_factor
        self.drop_last = drop_last
        self.epoch, self.index = 0, 0

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """All batches of `epoch`, a pure function of (seed, epoch)."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.lengths)).tolist()
        if self.group_by_length:
            size = self.batch_size * self.mega_batch_factor
            order = [i for start in range(0, len(order), size)
                     for i in sorted(order[start : start + size], key=lambda i: -self.lengths[i])]
        batches = [order[start : start + self.batch_size] for start in range(0, len(order), self.batch_size)]
        if self.drop_last and len(batches[-1]) < self.batch_size:
            batches.pop()
        if self.group_by_length:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def __len__(self) -> int:
        full, rest = divmod(len(self.lengths), self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def __iter__(self):
        """Yield the rest of the current epoch from the saved index, then move to the next epoch."""
        batches = self.epoch_batches(self.epoch)
        while self.index < len(batches):
            self.index += 1  # counted before handing out, so a checkpoint taken now resumes after this batch
            yield batches[self.index - 1]
        self.epoch, self.index = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"LengthGroupedSampler: checkpoint seed {state['seed']} != {self.seed}")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


# ----------------------------------------------------------------------------------------------------
# Packing
# ----------------------------------------------------------------------------------------------------


def pack(examples: Sequence[dict], max_length: int) -> list[list[int]]:
    """Best-fit decreasing: group example indices into rows of at most max_length tokens.

    Longest example first; each goes into the row with the least room that still fits it, else a new row.
    Returns rows as lists of indices into `examples` (deterministic: ties keep the original order).
    """
    lengths = [len(example["input_ids"]) for example in examples]
    for index, n in enumerate(lengths):
        if n > max_length:
            raise ValueError(f"pack: example {index} has {n} tokens > max_length={max_length}; "
                             "truncate first (tokenize_records(..., max_length=...))")
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []  # sorted (free tokens, row index)
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        slot = bisect.bisect_left(room, (lengths[index], -1))  # first row with enough free tokens
        if slot == len(room):
            rows.append([index])
            bisect.insort(room, (max_length - lengths[index], len(rows) - 1))
        else:
            free, row = room.pop(slot)
            rows[row].append(index)
            bisect.insort(room, (free - lengths[index], row))
    return rows


def packed_attention_mask(seq_ids: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """seq_ids (B, T) -> boolean (B, 1, T, T), True where query t may attend key s: same example (and s <= t).

    Padding (seq id 0) forms its own block, so no query row is all False (that would make softmax NaN).
    """
    same = seq_ids[:, :, None] == seq_ids[:, None, :]  # (B, T, T)
    if causal:
        T = seq_ids.size(1)
        same = same & torch.ones(T, T, dtype=torch.bool, device=seq_ids.device).tril()
    return same[:, None]  # (B, 1, T, T)


def collate_packed(rows: Sequence[Sequence[dict]], pad_id: int, pad_to: int | None = None,
                   causal: bool = True) -> dict[str, torch.Tensor]:
    """Packed rows (each a list of examples) -> input_ids, labels, position_ids, seq_ids (B, T), attention_mask.

    attention_mask is the (B, 1, T, T) block-diagonal (causal) boolean mask from `packed_attention_mask`;
    pass it with position_ids to the model. seq_ids numbers the examples of a row 1, 2, ... (0 = padding).
    With causal=True the first label of every example is -100 (see the module lesson).
    """
    T = pad_to or max(sum(len(example["input_ids"]) for example in row) for row in rows)
    B = len(rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    position_ids = torch.zeros(B, T, dtype=torch.long)  # (B, T)
    seq_ids = torch.zeros(B, T, dtype=torch.long)  # (B, T)
    for b, row in enumerate(rows):
        start = 0
        for number, example in enumerate(row, start=1):
            n = len(example["input_ids"])
            if start + n > T:
                raise ValueError(f"collate_packed: row {b} holds {start + n} tokens > pad_to={T}")
            input_ids[b, start : start + n] = torch.tensor(example["input_ids"], dtype=torch.long)
            if "labels" in example:
                example_labels = torch.tensor(example["labels"], dtype=torch.long)
                if causal:
                    example_labels[0] = IGNORE_INDEX
                labels[b, start : start + n] = example_labels
            position_ids[b, start : start + n] = torch.arange(n)
            seq_ids[b, start : start + n] = number
            start += n
        position_ids[b, start:] = torch.arange(T - start)  # padding: harmless in-range positions
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "seq_ids": seq_ids,
            "attention_mask": packed_attention_mask(seq_ids, causal)}

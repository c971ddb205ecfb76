"""From the [data] section to a stream of micro-batches that a resumed run can re-enter at any position.

Lesson
------
The trainer asks one question of its data: "give me the k micro-batches that come after the first p".
Answering it without any hidden iterator state is what makes resume exact:

    position p  ->  epoch e = p // batches_per_epoch,  index i = p % batches_per_epoch
    batches of epoch e = LengthGroupedSampler.epoch_batches(e)      a pure function of (seed, e)

so the checkpoint stores one integer (the number of micro-batches consumed) and the resumed run draws the
very batch the interrupted one would have drawn next. An optimizer step may straddle two epochs; nothing
special happens there.

Records become examples here, once, before training (minift/data.py does the work):

    .jsonl / .csv / bundled name --read--> records --tokenize_records--> examples (input_ids, labels)
        [--pack--> rows of several examples]  --collate / collate_packed--> batch tensors

The task decides the record format: `causal_lm` uses data.format (text, prompt_completion, alpaca, chat),
`masked_lm` reads plain text, `classification` reads text + label. Without a validation file, a seeded
share of the train records (validation_fraction) is held out; bundled datasets use their own split.
"""

from __future__ import annotations

import math

import numpy as np

from minift.data import (LengthGroupedSampler, Record, collate, collate_packed, label_names, pack, read_records,
                         tokenize_records)
from minift.datasets import load_fortunes, load_tweet_preferences, load_tweet_prompts, load_tweet_sentiment

BUNDLED_DATASETS = {"tweet-sentiment": load_tweet_sentiment, "fortunes": load_fortunes,
                    "tweet-preferences": load_tweet_preferences, "tweet-prompts": load_tweet_prompts}  # the last two:
#                   positive > negative tweet pairs (reward models), tweets' first words (RL prompts); see datasets.py
FORMAT_OF_TASK = {"masked_lm": "mlm", "classification": "classification"}


class BatchStream:
    """Micro-batches of `batch_size` units (examples, or packed rows of examples) in a seeded order."""

    def __init__(self, units: list[list[dict]], pad_id: int, batch_size: int, seed: int = 0,
                 group_by_length: bool = False, packed: bool = False, causal: bool = True, report: str = "") -> None:
        if not units:
            raise ValueError("no examples left to train on (empty dataset, or every example lost its targets)")
        self.units, self.pad_id, self.packed, self.causal, self.report = units, pad_id, packed, causal, report
        lengths = [sum(len(example["input_ids"]) for example in unit) for unit in units]
        self.sampler = LengthGroupedSampler(lengths, batch_size, seed=seed, group_by_length=group_by_length)
        self._epoch, self._batches = -1, []

    def __len__(self) -> int:
        """Micro-batches per epoch."""
        return len(self.sampler)

    @property
    def n_examples(self) -> int:
        return sum(len(unit) for unit in self.units)

    def epoch_of(self, position: int) -> float:
        return position / len(self)

    def batch_at(self, position: int) -> dict:
        epoch, index = divmod(position, len(self))
        if epoch != self._epoch:  # the order of one epoch, computed once
            self._epoch, self._batches = epoch, self.sampler.epoch_batches(epoch)
        return self.collate([self.units[i] for i in self._batches[index]])

    def take(self, position: int, count: int) -> list[dict]:
        """The `count` micro-batches that follow the first `position` ones of the endless seeded stream."""
        return [self.batch_at(p) for p in range(position, position + count)]

    def in_order(self):
        """Every unit once, in dataset order (evaluation)."""
        size = self.sampler.batch_size
        for start in range(0, len(self.units), size):
            yield self.collate(self.units[start : start + size])

    def collate(self, units: list[list[dict]]) -> dict:
        if self.packed:
            return collate_packed(units, self.pad_id, causal=self.causal)
        return collate([unit[0] for unit in units], self.pad_id)


def read_source(source: str, split: str) -> list[Record]:
    """Records of a file, or of a bundled dataset's split."""
    if source in BUNDLED_DATASETS:
        return BUNDLED_DATASETS[source](split)
    return read_records(source)


def rename_fields(records: list[Record], fields: dict[str, str]) -> list[Record]:
    """Copy each record with its configured field names mapped to the ones minift.data expects."""
    fields = {theirs: ours for ours, theirs in fields.items() if theirs != ours}
    if not fields:
        return records
    renamed = []
    for record in records:
        for theirs in fields:
            if theirs not in record:
                raise ValueError(f"{record.where}: missing field {theirs!r} (record has {sorted(record)})")
        renamed.append(Record({fields.get(k, k): v for k, v in record.items()}, record.where))
    return renamed


def split_records(records: list[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Hold out a seeded random `fraction` of the records (at least one, if there are two or more)."""
    if fraction <= 0 or len(records) < 2:
        return records, []
    order = np.random.default_rng(seed).permutation(len(records)).tolist()
    n_validation = min(max(1, math.floor(len(records) * fraction)), len(records) - 1)
    held_out = set(order[:n_validation])
    return ([r for i, r in enumerate(records) if i not in held_out],
            [r for i, r in enumerate(records) if i in held_out])


def take_subset(records: list[Record], count: int | None, seed: int) -> list[Record]:
    """A seeded random `count` of the records, kept in their original order (all of them when count is None).

    Not simply the first `count`: real files are often sorted (the tweet corpus by label, fortunes by
    category), and the head of a sorted file is one class. A random subset is a fair sample of the whole.
    """
    if count is None or count >= len(records):
        return records
    if count < 0:
        raise ValueError(f"max_examples / max_eval_examples must be >= 0, got {count}")
    keep = set(np.random.default_rng(seed).permutation(len(records))[:count].tolist())
    return [record for i, record in enumerate(records) if i in keep]


def read_splits(data, seed: int, check=None) -> tuple[list[Record], list[Record]]:
    """The train and validation records of a [data] section (every task kind reads them this way).

    Validation: data.validation if given, a bundled dataset's own validation split, else a seeded
    validation_fraction held out of the train records; then max_examples / max_eval_examples subsets.
    `check(record)`, if given, sees every record read, before any is split off or tokenized.
    """
    records = read_source(data.train, "train")
    if check is not None:
        for record in records:
            check(record)
    if data.validation:
        validation = read_source(data.validation, "validation")
    elif data.train in BUNDLED_DATASETS:
        validation = read_source(data.train, "validation") if data.validation_fraction > 0 else []
    else:
        records, validation = split_records(records, data.validation_fraction, seed)
    if check is not None:
        for record in validation:  # a validation file's records too
            check(record)
    return take_subset(records, data.max_examples, seed), take_subset(validation, data.max_eval_examples, seed)


def load_datasets(config, tokenizer) -> tuple[BatchStream, BatchStream | None, list[str] | None]:
    """Read, split, tokenize and batch the [data] of a RunConfig; returns (train, validation, labels)."""
    data, task, train = config.data, config.task, config.train
    if not data.train:
        raise ValueError("data.train is empty: set it to a .jsonl/.csv file or a bundled dataset "
                         f"({', '.join(BUNDLED_DATASETS)})")
    records, validation = read_splits(data, train.seed)

    fmt = FORMAT_OF_TASK.get(task.kind, data.format)
    fields = {"text": data.text_field}
    if task.kind == "classification":
        fields["label"] = data.label_field
    if fmt in ("text", "mlm", "classification"):
        records, validation = rename_fields(records, fields), rename_fields(validation, fields)
    labels = None
    if task.kind == "classification":
        labels = list(task.labels) if task.labels else label_names(records)
        if len(labels) < 2:
            raise ValueError(f"{data.train}: classification needs at least 2 distinct labels, found {labels}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token; cannot pad batches")

    def stream(records, shuffle_seed, name):
        examples, report = tokenize_records(records, tokenizer, fmt, data.max_length, labels)
        if not examples:
            raise ValueError(f"{name}: empty dataset after tokenizing ({report})")
        packed = data.packing and task.kind == "causal_lm"
        units = [[examples[i] for i in row] for row in pack(examples, data.max_length)] if packed \
            else [[example] for example in examples]
        return BatchStream(units, pad_id, train.batch_size, seed=shuffle_seed, group_by_length=data.group_by_length,
                           packed=packed, causal=task.kind == "causal_lm", report=f"{name}: {report}")

    train_stream = stream(records, train.seed, f"train ({data.train})")
    eval_stream = stream(validation, train.seed, "validation") if validation else None
    return train_stream, eval_stream, labels

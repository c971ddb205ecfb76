"""Preference data for the engine: {prompt, chosen, rejected} records -> a resumable stream of pair batches.

Lesson
------
A preference run reads its [data] like any other run (a .jsonl/.csv file, or a bundled name; a seeded share held
out for validation when no validation file is given), but each record is a pair, checked and tokenized by
minift.align.preference:

    records --check_preference (file:line errors)--> --tokenize_preference (prompt cut first)--> pair examples
        --PairStream--> micro-batches [chosen ; rejected] (2B, T) with n_targets = B pairs

PairStream is a BatchStream: the same seeded, length-grouped order (minift/data.py), addressed by position, so
the checkpoint's one integer (micro-batches consumed) is all a resumed run needs. A pair's length for grouping
is its prompt plus its longer answer.

`[task] precompute_reference = true` (DPO): prepare_pair_run scores every train and validation pair under the
reference once, at setup, and the batches then carry `reference_logps`; the frozen reference copy of a full
fine-tuning run is released afterwards, so training holds one model. The reference is the starting model in
both cases, so a resumed run recomputes the very same numbers.
"""

from __future__ import annotations

from minift.align.dpo import precompute_reference_logprobs
from minift.align.preference import check_preference, collate_preferences, tokenize_preference
from minift.data import LengthGroupedSampler
from minift.train.batches import BUNDLED_DATASETS, BatchStream, read_splits


class PairStream(BatchStream):
    """Micro-batches of `batch_size` preference pairs in a seeded order; collated by collate_preferences."""

    def __init__(self, examples: list[dict], pad_id: int, batch_size: int, seed: int = 0,
                 group_by_length: bool = False, report: str = "") -> None:
        if not examples:
            raise ValueError("no preference pairs to train on")
        self.units, self.pad_id, self.packed, self.causal, self.report = [[e] for e in examples], pad_id, False, True, report
        lengths = [len(e["prompt_ids"]) + max(len(e["chosen_ids"]), len(e["rejected_ids"])) for e in examples]
        self.sampler = LengthGroupedSampler(lengths, batch_size, seed=seed, group_by_length=group_by_length)
        self._epoch, self._batches = -1, []

    def collate(self, units: list[list[dict]]) -> dict:
        batch = collate_preferences([unit[0] for unit in units], self.pad_id)
        batch["n_targets"] = len(units)  # pairs: what the loss is averaged over
        return batch

    @property
    def examples(self) -> list[dict]:
        return [unit[0] for unit in self.units]


def tokenize_pairs(records, tokenizer, max_length: int, name: str) -> tuple[list[dict], str]:
    examples, cut = [], 0
    for record in records:
        example = tokenize_preference(check_preference(record), tokenizer, max_length)
        cut += example["n_truncated"] > 0
        examples.append(example)
    if not examples:
        raise ValueError(f"{name}: no preference records")
    return examples, f"{len(examples)} pairs, {cut} truncated to max_length {max_length}"


def load_pair_datasets(config, tokenizer) -> tuple[PairStream, PairStream | None, None]:
    """Read, check, split and tokenize the [data] of a reward or preference run; returns (train, validation, None)."""
    data, train = config.data, config.train
    if not data.train:
        raise ValueError("data.train is empty: set it to a .jsonl/.csv file of {prompt, chosen, rejected} records "
                         f"or a bundled dataset ({', '.join(BUNDLED_DATASETS)})")
    records, validation = read_splits(data, train.seed, check=check_preference)  # every bad record, before tokens
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token; cannot pad batches")

    bos = 1 if getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id is not None else 0
    if data.max_length < 2 + bos:  # as tokenize_preference's own check, but named as the config field
        raise ValueError(f"data.max_length = {data.max_length} leaves no room for a prompt and a completion "
                         f"(a pair needs at least {2 + bos} tokens)")

    def stream(records, name):
        examples, report = tokenize_pairs(records, tokenizer, data.max_length, name)
        return PairStream(examples, pad_id, train.batch_size, seed=train.seed, group_by_length=data.group_by_length,
                          report=f"{name}: {report}")

    train_stream = stream(records, f"train ({data.train})")
    eval_stream = stream(validation, "validation") if validation else None
    return train_stream, eval_stream, None


def prepare_pair_run(task_model, train_stream: PairStream, eval_stream: PairStream | None, config) -> None:
    """At setup, after the model is on its device: precompute the DPO reference log-probs if asked to."""
    if task_model.kind != "preference" or not config.task.precompute_reference:
        return
    reference = task_model.reference
    for stream in (train_stream, eval_stream):
        if stream is None:
            continue
        was_training = task_model.training
        task_model.eval()
        scored = precompute_reference_logprobs(task_model.backbone, stream.examples, stream.pad_id,
                                               config.train.batch_size, reference_model=reference.copy)
        task_model.train(was_training)
        stream.units = [[example] for example in scored]
    reference.release()

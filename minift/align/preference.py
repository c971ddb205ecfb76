"""Preference data: {prompt, chosen, rejected} records -> token ids and completion masks for DPO and reward models.

Lesson
------
Learning from preferences (InstructGPT, Ouyang et al. 2022, §3.5; DPO, Rafailov et al. 2023, §4) needs pairs: one
prompt x and two answers, the one people preferred (y_w, "chosen") and the other (y_l, "rejected"). A record is one
JSON object per line, in TRL's layout, as text or as a conversation:

    {"prompt": "The weather today is", "chosen": " lovely.", "rejected": " awful."}
    {"prompt": [{"role": "user", "content": "Hi"}],
     "chosen": [{"role": "assistant", "content": "Hello!"}], "rejected": [{"role": "assistant", "content": "Go away."}]}

A conversation may also leave out "prompt": then chosen and rejected are whole conversations, and their longest
common run of leading messages is the prompt (TRL's "implicit prompt").

Each record becomes two sequences that share the same prompt tokens. Only completion tokens are scored, so each
sequence carries a completion mask (1 = this token's log-probability counts):

    prompt + chosen     x1 x2 x3 | w1 w2 </s>          completion_mask  0 0 0 | 1 1 1
    prompt + rejected   x1 x2 x3 | l1 l2 l3 </s>                        0 0 0 | 1 1 1 1

The tokens themselves come from minift.data's tokenizer helpers (the same ones SFT uses): prompt and completion are
encoded separately, EOS is appended to a text completion, a chat completion is rendered with the chat template.

Truncation, prompt side first. When prompt + the longer completion exceed max_length, the prompt loses tokens from
its *start* (the words nearest the answer matter most), but keeps at least `keep_prompt_tokens` of them; only then
are the completions cut at their end. A BOS token, if any, stays in front.

Batches follow TRL's layout: the B chosen sequences, then the B rejected ones, right-padded to one length, so one
forward pass scores both halves:

    input_ids (2B, T) = [chosen_1 .. chosen_B ; rejected_1 .. rejected_B]     -> .chunk(2) splits them again

A bad record (a missing field, an empty completion, chosen identical to rejected) is an error of one line that
names file:line, raised before any token is made.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from minift.data import Record, _chat_segments, read_records, tokenize_example
from minift.losses import IGNORE_INDEX

FIELDS = ("prompt", "chosen", "rejected")

# ----------------------------------------------------------------------------------------------------
# Reading and checking records
# ----------------------------------------------------------------------------------------------------


def _is_conversation(value) -> bool:
    return isinstance(value, list) and all(isinstance(message, dict) for message in value)


def _text_of(completion) -> str:
    if isinstance(completion, str):
        return completion
    return "".join(str(message.get("content", "")) for message in completion)


def check_preference(record: dict) -> dict:
    """Validate one record and return it in explicit form {prompt, chosen, rejected} (a new dict, same `where`).

    Text form: three strings (the prompt may be ""). Chat form: three lists of {role, content} messages, or
    chosen and rejected alone as whole conversations (the shared leading messages become the prompt).
    """
    where = getattr(record, "where", "record")
    for name in ("chosen", "rejected"):
        if name not in record:
            raise ValueError(f"{where}: missing field {name!r} (record has {sorted(record)}); a preference record "
                             "needs prompt, chosen and rejected")
    chosen, rejected = record["chosen"], record["rejected"]
    if isinstance(chosen, str) and isinstance(rejected, str):
        if "prompt" not in record:
            raise ValueError(f"{where}: missing field 'prompt' (record has {sorted(record)}); a text preference "
                             "record needs prompt, chosen and rejected")
        prompt = record["prompt"]
        if not isinstance(prompt, str):
            raise ValueError(f"{where}: field 'prompt' must be a string like chosen and rejected, got "
                             f"{type(prompt).__name__}")
    elif _is_conversation(chosen) and _is_conversation(rejected):
        if "prompt" in record:
            prompt = record["prompt"]
            if not _is_conversation(prompt):
                raise ValueError(f"{where}: field 'prompt' must be a list of {{role, content}} messages like chosen "
                                 f"and rejected, got {type(prompt).__name__}")
        else:  # implicit prompt: the messages both conversations start with
            shared = 0
            while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
                shared += 1
            prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
        for name, completion in (("chosen", chosen), ("rejected", rejected)):
            if completion and completion[0].get("role") != "assistant":
                raise ValueError(f"{where}: {name} must start with an assistant message, got role "
                                 f"{completion[0].get('role')!r}")
    else:
        raise ValueError(f"{where}: chosen and rejected must both be strings or both be lists of {{role, content}} "
                         f"messages, got {type(chosen).__name__} and {type(rejected).__name__}")
    for name, completion in (("chosen", chosen), ("rejected", rejected)):
        if not _text_of(completion).strip():
            raise ValueError(f"{where}: field {name!r} is an empty completion; each answer of a pair needs text")
    if chosen == rejected:
        raise ValueError(f"{where}: chosen and rejected are identical, so the pair teaches nothing; drop it or fix it")
    return Record({"prompt": prompt, "chosen": chosen, "rejected": rejected}, where)


def read_preferences(path: str | Path) -> list[Record]:
    """Read a .jsonl (or .csv) of preference records with minift.data.read_records and check every one."""
    return [check_preference(record) for record in read_records(path)]


# ----------------------------------------------------------------------------------------------------
# Tokenizing one pair
# ----------------------------------------------------------------------------------------------------


def _text_pair_part(prompt: str, completion: str, tokenizer, where: str) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, completion ids, completion mask) of a text completion, through data.tokenize_example."""
    example = tokenize_example(Record({"prompt": prompt, "completion": completion}, where), tokenizer,
                               fmt="prompt_completion", add_bos=False)
    ids, labels = example["input_ids"], example["labels"]
    n_prompt = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    return ids[:n_prompt], ids[n_prompt:], [1] * (len(ids) - n_prompt)


def _chat_pair_part(prompt: list, completion: list, tokenizer, where: str) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, completion ids, completion mask) of a chat completion, through data's chat segments.

    data._chat_segments renders the conversation turn by turn: for each assistant message a (prompt piece,
    untrained) and a (turn, trained) segment, an EOS segment if the template does not end turns with EOS, and
    the untrained rest. The assistant turns inside the prompt are context here, so the prompt is every segment
    up to the generation prompt of the first completion turn; the trailing rest (a newline) is left out.
    """
    segments = _chat_segments(Record({"messages": list(prompt) + list(completion)}, where), tokenizer, where)
    n_prompt_segments = 2 * sum(message.get("role") == "assistant" for message in prompt) + 1
    prompt_ids = [token for ids, _ in segments[:n_prompt_segments] for token in ids]
    body = segments[n_prompt_segments:-1]
    return (prompt_ids, [token for ids, _ in body for token in ids],
            [int(trained) for ids, trained in body for _ in ids])


def tokenize_preference(record: dict, tokenizer, max_length: int | None = None, keep_prompt_tokens: int | None = None,
                        add_bos: bool | None = None) -> dict:
    """One preference record -> {"prompt_ids", "chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask",
    "n_truncated"} (lists of ints; a mask is 1 on scored completion tokens).

    max_length: the longest sequence (prompt + completion); longer pairs are cut, the prompt first (from its start,
    down to keep_prompt_tokens, default max_length // 2), then the completions (at their end).
    add_bos: put the BOS token before a text prompt (default: the tokenizer's `add_bos_token`, as in minift.data).
    """
    record = check_preference(record)
    where = record.where
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenize_preference: the tokenizer has no EOS token; set one so completions end")
    part = _text_pair_part if isinstance(record["chosen"], str) else _chat_pair_part
    prompt_ids, chosen_ids, chosen_mask = part(record["prompt"], record["chosen"], tokenizer, where)
    prompt_again, rejected_ids, rejected_mask = part(record["prompt"], record["rejected"], tokenizer, where)
    if prompt_again != prompt_ids:
        raise ValueError(f"{where}: the prompt tokenizes differently before chosen and before rejected")
    for name, mask in (("chosen", chosen_mask), ("rejected", rejected_mask)):
        if not any(mask):
            raise ValueError(f"{where}: the {name} completion has no tokens to score")
    bos = []
    use_bos = add_bos if add_bos is not None else getattr(tokenizer, "add_bos_token", False)
    if use_bos and isinstance(record["chosen"], str):
        if tokenizer.bos_token_id is None:
            raise ValueError("tokenize_preference: add_bos is set but the tokenizer has no BOS token")
        bos = [tokenizer.bos_token_id]

    n_cut = 0
    if max_length is not None:
        if max_length < 2 + len(bos):
            raise ValueError(f"tokenize_preference: max_length={max_length} leaves no room for prompt and completion")
        longest = max(len(chosen_ids), len(rejected_ids))
        room = max_length - len(bos)  # tokens for prompt + completion
        if len(prompt_ids) + longest > room:
            floor = keep_prompt_tokens if keep_prompt_tokens is not None else room // 2
            keep = max(room - longest, min(len(prompt_ids), floor, room - 1))  # prompt tokens kept (its end)
            n_cut += len(prompt_ids) - keep
            prompt_ids = prompt_ids[len(prompt_ids) - keep:]
            budget = room - keep  # completion tokens kept (their start)
            n_cut += max(len(chosen_ids) - budget, 0) + max(len(rejected_ids) - budget, 0)
            chosen_ids, chosen_mask = chosen_ids[:budget], chosen_mask[:budget]
            rejected_ids, rejected_mask = rejected_ids[:budget], rejected_mask[:budget]
            if not any(chosen_mask) or not any(rejected_mask):
                raise ValueError(f"{where}: max_length={max_length} leaves no completion token to score")
    return {"prompt_ids": bos + prompt_ids, "chosen_ids": chosen_ids, "chosen_mask": chosen_mask,
            "rejected_ids": rejected_ids, "rejected_mask": rejected_mask, "n_truncated": n_cut}


def tokenize_preferences(records: Sequence[dict], tokenizer, max_length: int | None = None,
                         keep_prompt_tokens: int | None = None, add_bos: bool | None = None) -> list[dict]:
    """tokenize_preference over a dataset."""
    if not records:
        raise ValueError("tokenize_preferences: empty dataset")
    return [tokenize_preference(record, tokenizer, max_length, keep_prompt_tokens, add_bos) for record in records]


# ----------------------------------------------------------------------------------------------------
# Batches: [chosen ; rejected], right-padded
# ----------------------------------------------------------------------------------------------------


def collate_preferences(examples: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Pairs -> input_ids, attention_mask, completion_mask, each (2B, T): the B chosen rows, then the B rejected.

    Padding is recognised by position (attention_mask 0, completion_mask 0), never by id, so pad_id may equal EOS.
    Examples with precomputed reference log-probs also give reference_logps (2B,), in the same row order.
    """
    if not examples:
        raise ValueError("collate_preferences: no examples")
    rows = [(e["prompt_ids"] + e["chosen_ids"], [0] * len(e["prompt_ids"]) + list(e["chosen_mask"])) for e in examples]
    rows += [(e["prompt_ids"] + e["rejected_ids"], [0] * len(e["prompt_ids"]) + list(e["rejected_mask"]))
             for e in examples]
    T = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)  # (2B, T)
    attention_mask = torch.zeros(len(rows), T, dtype=torch.long)  # (2B, T)
    completion_mask = torch.zeros(len(rows), T, dtype=torch.long)  # (2B, T)
    for row, (ids, mask) in enumerate(rows):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
        completion_mask[row, : len(ids)] = torch.tensor(mask, dtype=torch.long)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}
    if all("reference_chosen_logps" in e for e in examples):  # precomputed (dpo.precompute_reference_logprobs)
        batch["reference_logps"] = torch.tensor([e["reference_chosen_logps"] for e in examples]
                                                + [e["reference_rejected_logps"] for e in examples])  # (2B,)
    return batch

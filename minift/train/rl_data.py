"""Prompts and rollouts for the RL tasks: a stream whose micro-batches the policy writes (minift/train/rl_tasks.py).

Lesson
------
The loop asks every stream the same question, "the k micro-batches after the first p", and an RL stream answers
it from prompts plus the current policy:

    records {"prompt": text or [{role, content}, ...]} --tokenize (cut from the left to data.max_length)-->
    prompt batches in a seeded order (LengthGroupedSampler, as every stream), left-padded for `generate`

    GRPO   micro-batch p = the rollout of prompt batch p: G samples per prompt, sampled with a generator
           seeded by (seed, p); k rollouts serve one optimizer step. With num_iterations = mu > 1, step s uses
           the k rollouts of prompt batches (s // mu) k ... (s // mu) k + k - 1, the same ones mu steps in a row,
           kept and saved as PPO's are (below), with the sampling policy's log-probs (old_logps) for the ratio
    PPO    a rollout covers num_minibatches x k prompt batches; optimizer step s belongs to rollout
           i = s // (ppo_epochs x num_minibatches), epoch e and minibatch m within it. The rollout's micro-batches
           are shuffled per epoch by a seeded permutation (whole micro-batches of B sequences move together, and
           advantages are whitened within each), and minibatch m takes k of them. The rollout is made when its
           first step comes, kept in the task model, and saved in the checkpoint's state.json (task_state), so a run
           stopped between two PPO epochs resumes with the very same rollout.

The validation stream makes one rollout per prompt batch in order, seeded by (seed, -index), with no update of
the adaptive KL coefficient; its loss is not what matters, its eval_reward and eval_kl are.

`data.train` is a .jsonl/.csv of prompt records, or "tweet-prompts" (the bundled tweets' first words).
"""

from __future__ import annotations

import numpy as np
import torch

from minift.align.sampled_pairs import prompt_ids
from minift.data import LengthGroupedSampler, Record
from minift.train.batches import BUNDLED_DATASETS, read_splits
from minift.train.preference_data import load_pair_datasets, prepare_pair_run
from minift.train.preference_tasks import PAIR_KINDS
from minift.train.rl_tasks import RL_KINDS, make_reward, rollout_generator


def tokenize_prompt(record: Record, tokenizer, max_length: int) -> dict:
    """{"ids": prompt token ids (cut from the left), "text": the prompt text the reward reads}."""
    where = getattr(record, "where", "record")
    if "prompt" not in record:
        raise ValueError(f"{where}: missing field 'prompt' (record has {sorted(record)}); an RL prompt record is "
                         "{\"prompt\": text or a list of {role, content} messages}")
    prompt = record["prompt"]
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError(f"{where}: field 'prompt' is empty; the policy needs something to continue")
        ids, text = prompt_ids(tokenizer, prompt), prompt  # BOS first when the tokenizer adds one
    elif isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
        try:
            chat = tokenizer.apply_chat_template(prompt, add_generation_prompt=True)
        except ValueError as error:  # no template, or a message it cannot render: say which record
            raise ValueError(f"{where}: field 'prompt' is a list of messages: {error}") from None
        ids, text = tokenizer.encode(chat), ""
    else:
        raise ValueError(f"{where}: field 'prompt' must be a non-empty string or list of {{role, content}} messages, "
                         f"got {type(prompt).__name__}")
    if not ids:
        raise ValueError(f"{where}: the prompt has no tokens")
    return {"ids": ids[-max_length:], "text": text}


class RolloutStream:
    """Micro-batches the policy writes (see the lesson). `model` and `tokenizer` are set by prepare_align_run."""

    def __init__(self, prompts: list[dict], pad_id: int, batch_size: int, seed: int, kind: str, options,
                 grad_accum_steps: int, report: str = "") -> None:
        if not prompts:
            raise ValueError("no prompts to sample from")
        self.prompts, self.pad_id, self.seed, self.kind, self.options = prompts, pad_id, seed, kind, options
        self.k, self.report = grad_accum_steps, report
        self.sampler = LengthGroupedSampler([len(p["ids"]) for p in prompts], batch_size, seed=seed,
                                            group_by_length=False)
        self.model, self.tokenizer = None, None
        self._epoch, self._batches = -1, []

    @property
    def steps_per_rollout(self) -> int:
        if self.kind == "ppo":
            return self.options.ppo_epochs * self.options.num_minibatches
        return self.options.num_iterations

    def __len__(self) -> int:
        """Micro-batches per pass over the prompts (PPO visits each rollout ppo_epochs times, GRPO num_iterations)."""
        return len(self.sampler) * (self.options.ppo_epochs if self.kind == "ppo" else self.options.num_iterations)

    @property
    def n_examples(self) -> int:
        return len(self.prompts)

    def epoch_of(self, position: int) -> float:
        return position / len(self)

    def prompt_batch(self, position: int) -> tuple[dict, list[str]]:
        """Prompt batch `position` of the endless seeded order, left-padded, on the model's device."""
        epoch, index = divmod(position, len(self.sampler))
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, self.sampler.epoch_batches(epoch)
        return self.collate([self.prompts[i] for i in self._batches[index]])

    def collate(self, prompts: list[dict]) -> tuple[dict, list[str]]:
        T = max(len(p["ids"]) for p in prompts)
        ids = torch.tensor([[self.pad_id] * (T - len(p["ids"])) + p["ids"] for p in prompts])
        mask = torch.tensor([[0] * (T - len(p["ids"])) + [1] * len(p["ids"]) for p in prompts])
        device = next(self.model.parameters()).device
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}, [p["text"] for p in prompts]

    def rollout(self, prompts: dict, texts: list[str], index: int, update_kl: bool = True) -> dict:
        """The rollout of one prompt batch, sampled with the generator of `index`."""
        generator = rollout_generator(self.seed, index, prompts["input_ids"].device)
        if self.kind == "grpo":
            return self.model.rollout(prompts, texts, generator, self.tokenizer)
        batch = self.model.rollout(prompts, texts, generator, self.tokenizer, update_kl=update_kl)
        batch["rollout_metrics"] = {"reward": float(batch["scores"].mean()), "kl": float(batch["kl"].mean()),
                                    "kl_coef": float(batch["kl_coef"])}
        batch["n_targets"] = int(batch["completion_mask"].sum())  # PPO averages over tokens
        return batch

    def take(self, position: int, count: int) -> list[dict]:
        if self.kind == "grpo" and self.steps_per_rollout == 1:
            return [self.rollout(*self.prompt_batch(p), p) for p in range(position, position + count)]
        if position % count:
            raise ValueError(f"{self.kind.upper()} stream: position {position} is not a multiple of grad_accum_steps "
                             f"{count}")
        step = position // count
        if self.kind == "grpo":  # num_iterations steps on the same k rollouts, kept (and saved) as PPO's
            index = step // self.steps_per_rollout
            parts = self.model.rollouts.get(index)
            if parts is None:
                first = index * count
                parts = [self.rollout(*self.prompt_batch(first + q), first + q) for q in range(count)]
                self.model.rollouts = {index: parts}
            return parts
        M, per = self.options.num_minibatches, self.steps_per_rollout
        index, within = divmod(step, per)
        epoch, minibatch = divmod(within, M)
        parts = self.model.rollouts.get(index)
        if parts is None:  # the first step of rollout `index`: sample it with the policy as it is now
            first = index * M * count
            parts = [self.rollout(*self.prompt_batch(first + q), first + q) for q in range(M * count)]
            self.model.rollouts = {index: parts}
        order = np.random.default_rng([self.seed, index, epoch]).permutation(len(parts)).tolist()
        return [parts[i] for i in order[minibatch * count : (minibatch + 1) * count]]

    def in_order(self):
        size = self.sampler.batch_size
        for q, start in enumerate(range(0, len(self.prompts), size)):
            yield self.rollout(*self.collate(self.prompts[start : start + size]), -(q + 1), update_kl=False)


def load_rl_datasets(config, tokenizer) -> tuple[RolloutStream, RolloutStream | None, None]:
    data, train, task = config.data, config.train, config.task
    if not data.train:
        raise ValueError("data.train is empty: set it to a .jsonl/.csv file of {\"prompt\": ...} records or "
                         f"a bundled dataset ({', '.join(BUNDLED_DATASETS)})")
    records, validation = read_splits(data, train.seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token; cannot pad prompts")

    def stream(records, name):
        prompts = [tokenize_prompt(r, tokenizer, data.max_length) for r in records]
        report = f"{name}: {len(prompts)} prompts; {task.kind} rollouts of {task.max_new_tokens} new tokens"
        return RolloutStream(prompts, pad_id, train.batch_size, train.seed, task.kind, task, train.grad_accum_steps,
                             report)

    train_stream = stream(records, f"train ({data.train})")
    eval_stream = stream(validation, "validation") if validation else None
    return train_stream, eval_stream, None


# ----------------------------------------------------------------------------------------------------
# The engine's entry points for every preference and RL task
# ----------------------------------------------------------------------------------------------------

ALIGN_KINDS = PAIR_KINDS + RL_KINDS


def check_align_run(config, backbone) -> None:
    """Before any record is read: every align task trains a decoder, and none packs its records."""
    kind, c = config.task.kind, backbone.config
    if kind == "reward" and not c.causal:
        raise ValueError(f"{config.model.source}: task reward reads the last token of a decoder; this "
                         f"{c.model_type} model is an encoder")
    if kind != "reward" and not (c.causal and c.lm_head):
        raise ValueError(f"{config.model.source}: task {kind} needs a decoder with an lm_head; this {c.model_type} "
                         "model is not one")
    if config.data.packing:
        raise ValueError(f"data.packing = true with [task] kind = {kind!r}: pairs and prompts are never packed into "
                         "rows; set data.packing = false")


def load_align_datasets(config, tokenizer):
    if config.task.kind in RL_KINDS:
        return load_rl_datasets(config, tokenizer)
    return load_pair_datasets(config, tokenizer)


def prepare_align_run(task_model, train_stream, eval_stream, config, tokenizer) -> None:
    """At setup, with the model on its device: DPO's precomputed reference; RL's reward and rollout policy."""
    if config.task.kind not in RL_KINDS:
        return prepare_pair_run(task_model, train_stream, eval_stream, config)
    task_model.reward = make_reward(config.task, next(task_model.parameters()).device)
    for stream in (train_stream, eval_stream):
        if stream is not None:
            stream.model, stream.tokenizer = task_model, tokenizer
    if tokenizer.eos_token_id is None:
        raise ValueError("RL tasks need a tokenizer with an EOS token (it ends each completion)")

"""Free generation with answer parsing: let the model write, then read a label out of what it wrote.

Lesson
------
Label scoring (scoring.py) only ever compares the label words, so it always returns a valid label. The
other way to use a model in context is the way a user would: generate an answer greedily and parse it
(OpenICL's "GenInferencer"; how chat models are used in practice):

    prompt  ->  model.generate(greedy, a few tokens)  ->  " positive\n\nTweet: ..."  ->  first line
            ->  earliest verbalizer word found in it (whole word, any case)  ->  "positive"

Generation can fail in ways scoring cannot: the model may answer "The sentiment is mixed", repeat the
tweet, or say nothing. Those answers parse to None and count as errors; `parse_rate` tells you how often
that happened, which is itself a useful measure of how well a prompt constrains the model.

Prompts are batched with left padding, so every row's next token is in the last column; the attention
mask keeps the pads out (see Transformer.generate).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from tqdm import tqdm

from minift.icl.scoring import PromptEncoder
from minift.icl.templates import CHATML_END, Prompt, Template


def parse_answer(text: str, template: Template) -> str | None:
    """The label whose verbalizer word appears first in the answer's first non-empty line, else None."""
    text = text.replace(CHATML_END, "\n")
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return None
    answer = lines[0].lower()
    best: tuple[int, int, str] | None = None  # (position, -length, label): earliest, then longest word
    for label, words in template.verbalizers.items():
        for word in words:
            match = re.search(r"(?<!\w)" + re.escape(word.strip().lower()) + r"(?!\w)", answer)
            if match and (best is None or (match.start(), -len(word)) < best[:2]):
                best = (match.start(), -len(word), label)
    return best[2] if best else None


@dataclass
class GeneratedAnswers:
    texts: list[str]  # what the model wrote after each prompt
    labels: list[str | None]  # parsed labels (None where no label word was found)

    @property
    def parse_rate(self) -> float:
        return sum(label is not None for label in self.labels) / max(len(self.labels), 1)


class AnswerGenerator:
    """Generate a short answer for each prompt and parse it into a label.

        generator = AnswerGenerator(model, tokenizer, template, max_new_tokens=5)
        answers = generator.generate([prompt_1, prompt_2])      # GeneratedAnswers
    """

    def __init__(self, model, tokenizer, template: Template, max_new_tokens: int = 5, batch_size: int = 8) -> None:
        if not (model.config.causal and model.config.lm_head):
            raise ValueError("free generation needs a causal language model with an lm_head")
        self.model, self.tokenizer, self.template = model.eval(), tokenizer, template
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.encoder = PromptEncoder(tokenizer)
        self.pad_id = getattr(tokenizer, "pad_token_id", None) or 0
        self.stop_ids = self._stop_ids()
        self.progress: bool | None = False  # a bar over the batches: True, False, or None (on a terminal only)

    def _stop_ids(self) -> list[int]:
        """EOS, plus ChatML's end-of-turn token when the template is a chat template."""
        eos = getattr(self.tokenizer, "eos_token_id", None)
        ids = ([eos] if isinstance(eos, int) else list(eos or []))
        if self.template.chat:
            end = self.encoder.encode(CHATML_END)
            if len(end) == 1 and end[0] not in ids:
                ids.append(end[0])
        return ids

    @torch.no_grad()
    def generate(self, prompts: list[Prompt]) -> GeneratedAnswers:
        texts: list[str] = []
        device = next(self.model.parameters()).device
        bar_off = None if self.progress is None else not self.progress
        for start in tqdm(range(0, len(prompts), self.batch_size), desc="icl generate", unit="batch", disable=bar_off):
            batch = [sum(self.encoder.prompt_ids(p), []) for p in prompts[start:start + self.batch_size]]
            width = max(len(ids) for ids in batch)
            ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            for row, prompt_ids in enumerate(batch):  # left padding
                ids[row, width - len(prompt_ids):] = torch.tensor(prompt_ids)
                mask[row, width - len(prompt_ids):] = 1
            out = self.model.generate(ids.to(device), max_new_tokens=self.max_new_tokens,
                                      eos_token_id=self.stop_ids or None, attention_mask=mask.to(device))
            for row in out[:, width:].tolist():
                cut = next((i for i, t in enumerate(row) if t in self.stop_ids), len(row))
                texts.append(self.tokenizer.decode(row[:cut]))
        return GeneratedAnswers(texts, [parse_answer(t, self.template) for t in texts])

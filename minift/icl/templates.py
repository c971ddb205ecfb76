"""Prompt templates for in-context learning: instruction, demonstrations, query, and label words.

Lesson
------
In-context learning (Brown et al. 2020, "Language Models are Few-Shot Learners", §2) classifies without
changing a single weight: we write a few solved examples (the *demonstrations*) in front of the query and
ask the language model which label word is the most likely continuation.

A template decides every character of that text. For the plain (completion) style:

    instruction                         "Classify the sentiment of each tweet."
    <separator>                         "\n\n"
    example_format(demo 1)              "Tweet: I love it\nSentiment: positive"
    <separator>
    ...                                                                              } prefix
    example_format(demo k)              "Tweet: worst flight ever\nSentiment: negative"
    <separator>                                                                      } query
    example_format(query) up to {label} "Tweet: on my way to Boston\nSentiment:"
                                        candidates: " negative" | " neutral" | " positive"

The *verbalizer* maps each label to one or more words ("positive" -> ["positive", "great"]); the first
word is used inside demonstrations, every word is a candidate answer. Following lm-evaluation-harness, the
whitespace in front of {label} belongs to the candidate (" positive"), not to the prompt: a BPE tokenizer
spells most words with their leading space, so "Sentiment:" + " positive" tokenizes the way the model saw
such text in training.

The chat style (ChatML, the format of SmolLM2-Instruct and Qwen) puts each demonstration in a user turn
and its label in an assistant turn, then asks the query in a last user turn:

    <|im_start|>system\n{instruction}<|im_end|>\n
    <|im_start|>user\nTweet: I love it\nSentiment:<|im_end|>\n<|im_start|>assistant\npositive<|im_end|>\n
    ...                                                                              } prefix
    <|im_start|>user\nTweet: on my way to Boston\nSentiment:<|im_end|>\n<|im_start|>assistant\n  } query

Every prompt is returned as two strings, `prefix` and `query`. The prefix depends only on the chosen
demonstrations, so when several queries (or the content-free inputs of calibration) share demonstrations,
the scorer computes the prefix once and reuses its keys and values (see scoring.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

CHATML_START, CHATML_END = "<|im_start|>", "<|im_end|>"


@dataclass(frozen=True)
class Prompt:
    """A prompt in two pieces: `prefix` (instruction + demonstrations) and `query` (ends where the answer starts)."""

    prefix: str
    query: str

    @property
    def text(self) -> str:
        return self.prefix + self.query


def chatml_turn(role: str, content: str, close: bool = True) -> str:
    """One ChatML turn: '<|im_start|>role\\ncontent<|im_end|>\\n' (left open for the assistant's answer)."""
    return f"{CHATML_START}{role}\n{content}" + (f"{CHATML_END}\n" if close else "")


@dataclass(frozen=True)
class Template:
    """How an instruction, demonstrations and a query become a prompt, and which words name each label.

    instruction:    text before the demonstrations ("" for none); the system turn in chat style.
    example_format: one example, with exactly one {text} and one {label} placeholder.
    separator:      text between the instruction and consecutive examples (plain style).
    verbalizers:    label -> list of words; the first word appears in demonstrations, all are candidates.
    chat:           False = plain completion prompt; True = ChatML conversation (demonstrations as turns).
    name:           a short name for tables (prompt search).
    """

    example_format: str = "Input: {text}\nLabel: {label}"
    verbalizers: dict[str, list[str]] = field(default_factory=dict)
    instruction: str = ""
    separator: str = "\n\n"
    chat: bool = False
    name: str = ""

    def __post_init__(self) -> None:
        for placeholder in ("{text}", "{label}"):
            count = self.example_format.count(placeholder)
            if count != 1:
                raise ValueError(
                    f"Template.example_format must contain {placeholder} exactly once (found {count}): "
                    f"{self.example_format!r}"
                )
        if self.example_format.index("{text}") > self.example_format.index("{label}"):
            raise ValueError(f"Template.example_format must put {{text}} before {{label}}: {self.example_format!r}")
        if not self.verbalizers:
            raise ValueError("Template.verbalizers is empty: give each label a list of words, e.g. {'pos': ['positive']}")
        # Accept a single string per label for convenience; store lists.
        normalized = {str(label): ([words] if isinstance(words, str) else list(words))
                      for label, words in self.verbalizers.items()}
        owner: dict[str, str] = {}
        for label, words in normalized.items():
            if not words or any(not isinstance(w, str) or not w.strip() for w in words):
                raise ValueError(f"Template.verbalizers[{label!r}] must be a non-empty list of non-empty words: {words!r}")
            for word in words:
                key = word.strip().lower()
                if key in owner and owner[key] != label:
                    raise ValueError(f"verbalizer word {word!r} is used by two labels ({owner[key]!r} and {label!r})")
                owner[key] = label
        object.__setattr__(self, "verbalizers", normalized)

    # ------------------------------------------------------------------ pieces of one example

    @property
    def labels(self) -> list[str]:
        return list(self.verbalizers)

    def _split_format(self) -> tuple[str, str, str]:
        """example_format -> (head without trailing whitespace, whitespace before {label}, tail after {label})."""
        head, tail = self.example_format.split("{label}")
        stripped = head.rstrip()
        return stripped, head[len(stripped):], tail

    def query_part(self, text: str) -> str:
        """The example format filled with `text`, cut just before the label (and its leading whitespace)."""
        head, _, _ = self._split_format()
        return head.replace("{text}", text)

    def answer_text(self, word: str) -> str:
        """What follows the query for a given label word: ' positive' (plain) or 'positive' (chat)."""
        _, gap, _ = self._split_format()
        return word if self.chat else gap + word

    def demonstration(self, text: str, label: str) -> str:
        """One solved example in plain style, labelled with the label's first verbalizer word."""
        if label not in self.verbalizers:
            raise ValueError(f"label {label!r} is not in the template's verbalizers {self.labels}")
        return self.example_format.replace("{text}", text).replace("{label}", self.verbalizers[label][0])

    def candidates(self) -> list[tuple[str, str]]:
        """Every (label, answer text) pair the scorer compares, labels in verbalizer order."""
        return [(label, self.answer_text(word)) for label, words in self.verbalizers.items() for word in words]

    # ------------------------------------------------------------------ whole prompts

    def build(self, demonstrations: list[tuple[str, str]], query: str) -> Prompt:
        """Prompt for `query` after the (text, label) demonstrations, in the order given (last = nearest)."""
        if self.chat:
            return self._build_chat(demonstrations, query)
        blocks = ([self.instruction] if self.instruction else []) + [self.demonstration(t, y) for t, y in demonstrations]
        prefix = self.separator.join(blocks)
        # The separator opens the query piece, so the prefix ends on a label word: a natural token boundary.
        query_text = (self.separator if prefix else "") + self.query_part(query)
        return Prompt(prefix=prefix, query=query_text)

    def _build_chat(self, demonstrations: list[tuple[str, str]], query: str) -> Prompt:
        prefix = chatml_turn("system", self.instruction) if self.instruction else ""
        for text, label in demonstrations:
            if label not in self.verbalizers:
                raise ValueError(f"label {label!r} is not in the template's verbalizers {self.labels}")
            prefix += chatml_turn("user", self.query_part(text))
            prefix += chatml_turn("assistant", self.verbalizers[label][0])
        query_text = chatml_turn("user", self.query_part(query)) + chatml_turn("assistant", "", close=False)
        return Prompt(prefix=prefix, query=query_text)

    def with_verbalizers(self, verbalizers: dict[str, list[str]], name: str | None = None) -> "Template":
        return replace(self, verbalizers=verbalizers, name=self.name if name is None else name)

    def describe(self) -> str:
        words = "; ".join(f"{label}={'/'.join(ws)}" for label, ws in self.verbalizers.items())
        style = "chat" if self.chat else "plain"
        return f"{self.name or 'template'} [{style}] {self.example_format!r} {words}"


def default_template(labels: list[str], chat: bool = False) -> Template:
    """A generic classification template whose label words are the label names themselves."""
    words = {label: [_as_word(label)] for label in labels}
    listing = ", ".join(w[0] for w in words.values())
    return Template(
        instruction=f"Classify each text as one of: {listing}.",
        example_format="Text: {text}\nLabel: {label}",
        verbalizers=words,
        chat=chat,
        name="default",
    )


def _as_word(label: str) -> str:
    word = re.sub(r"\s+", " ", str(label)).strip()
    if not word:
        raise ValueError(f"label {label!r} is blank: give it a verbalizer word")
    return word


def sentiment_templates(chat_too: bool = True) -> list[Template]:
    """A small grid of sentiment templates (3 formats x 3 verbalizer sets, plain and chat) for prompt search."""
    formats = {
        "tweet": ("Classify the sentiment of each tweet as negative, neutral or positive.",
                  "Tweet: {text}\nSentiment: {label}"),
        "review": ("", "{text}\nThe sentiment of this text is {label}"),
        "qa": ("Answer with one word.", "Text: {text}\nQuestion: Is the tone negative, neutral or positive?\nAnswer: {label}"),
    }
    verbalizer_sets = {
        "names": {"negative": ["negative"], "neutral": ["neutral"], "positive": ["positive"]},
        "words": {"negative": ["bad", "negative"], "neutral": ["neutral", "okay"], "positive": ["good", "positive"]},
        "moods": {"negative": ["angry"], "neutral": ["calm"], "positive": ["happy"]},
    }
    styles = [False, True] if chat_too else [False]
    return [
        Template(instruction=instruction, example_format=fmt, verbalizers=words, chat=chat,
                 name=f"{fname}/{vname}/{'chat' if chat else 'plain'}")
        for chat in styles
        for fname, (instruction, fmt) in formats.items()
        for vname, words in verbalizer_sets.items()
    ]

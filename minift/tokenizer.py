"""Tokenizer: a thin wrapper over a `tokenizers.Tokenizer` that adds what training and generation need.

Lesson
------
Text becomes token ids in four stages, all done by the Rust `tokenizers` library we wrap:

    "Hi 42!"  --normalizer-->  "Hi 42!"          (BERT: lowercase, strip accents; byte-level BPE: nothing)
              --pre-tokenizer--> ["Hi", " ", "4", "2", "!"]   (regex splits; SmolLM2 isolates every digit)
              --model (BPE / WordPiece)--> [12345, 216, 36, 34, 17]
              --post-processor--> [CLS] ... [SEP] for BERT when add_special_tokens=True; nothing for SmolLM2

This wrapper adds the parts a training loop needs and `tokenizers` leaves to the caller:

- the special ids (bos / eos / pad / mask), read from `tokenizer_config.json` + `special_tokens_map.json`
  or from GGUF metadata. A model without a pad token pads with eos (`pad_token_id = eos_token_id`): padded
  positions are masked out by the attention mask and by labels, so the id itself never matters -- but never
  drop "every eos" from the loss because of it, or the model never learns to stop.
- `encode_batch`: pad a list of texts into (B, T) ids + attention mask, on the left for generation (so every
  row's last token is real) or on the right for training and encoders.
- `apply_chat_template`: the ChatML conversation format in plain Python (no jinja), following the model's own
  template, including the default system message SmolLM2 inserts when the conversation has none:

      <|im_start|>system\\nYou are a helpful AI assistant named SmolLM, ...<|im_end|>\\n
      <|im_start|>user\\nWhat is 2 + 2?<|im_end|>\\n
      <|im_start|>assistant\\n                          <- the generation prompt

- `save`: tokenizer.json + tokenizer_config.json that `transformers.AutoTokenizer` loads unchanged.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from tokenizers import Tokenizer as HFTokenizer

# ChatML: the default system turn a template inserts when the conversation starts without one. The jinja
# source writes its newline either as a real newline or as the escape "\n" inside a quoted string.
CHATML_DEFAULT_SYSTEM = re.compile(r"<\|im_start\|>system(?:\n|\\n)(?P<text>[^'\"{}]*?)<\|im_end\|>")
SPECIAL_ROLES = ("bos", "eos", "pad", "unk", "mask", "cls", "sep")


class Tokenizer:
    """Encode/decode text, pad batches, format chats. Wraps (and reconfigures) a `tokenizers.Tokenizer`.

    Padding and truncation stored in a tokenizer.json (MiniLM's pads and cuts everything to 128) are switched
    off on the wrapped tokenizer, so `encode` returns exactly the text's ids; `encode_batch` pads.
    """

    def __init__(
        self,
        hf_tokenizer: HFTokenizer,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        chat_template: str | None = None,
        *,
        unk_token_id: int | None = None,
        mask_token_id: int | None = None,
        cls_token_id: int | None = None,
        sep_token_id: int | None = None,
    ) -> None:
        hf_tokenizer.no_padding()
        hf_tokenizer.no_truncation()
        self.inner = hf_tokenizer
        self.bos_token_id, self.eos_token_id = bos_token_id, eos_token_id
        self.pad_token_id = pad_token_id if pad_token_id is not None else eos_token_id  # fallback: pad with eos
        self.unk_token_id, self.mask_token_id = unk_token_id, mask_token_id
        self.cls_token_id, self.sep_token_id = cls_token_id, sep_token_id
        self.chat_template = chat_template

    # ---- construction --------------------------------------------------------------------------------

    @classmethod
    def from_file(cls, path: str | Path, config_dir: str | Path | None = None) -> Tokenizer:
        """Load tokenizer.json; special tokens and chat template from tokenizer_config.json,
        special_tokens_map.json and chat_template.jinja in `config_dir` (default: the same folder), if present."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such tokenizer file (expected a Hugging Face tokenizer.json)")
        try:
            inner = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a plain Exception on malformed JSON
            raise ValueError(f"{path}: not a valid tokenizer.json ({e})") from None
        folder = Path(config_dir) if config_dir is not None else path.parent
        config = {**_read_json(folder / "special_tokens_map.json"), **_read_json(folder / "tokenizer_config.json")}
        ids = {}
        for role in SPECIAL_ROLES:
            token = _token_content(config.get(f"{role}_token"))
            ids[f"{role}_token_id"] = inner.token_to_id(token) if token is not None else None
        template = config.get("chat_template")
        if isinstance(template, list):  # several named templates: [{"name": "default", "template": "..."}, ...]
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        if (folder / "chat_template.jinja").is_file():  # where recent transformers versions save it
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        return cls(inner, chat_template=template if isinstance(template, str) else None, **ids)

    # ---- encoding ------------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`. add_special_tokens=True runs the post-processor (BERT: [CLS] ... [SEP])."""
        return self.inner.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of `ids` (a list of ints or a 1-D tensor)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.inner.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def encode_batch(
        self,
        texts: list[str],
        padding_side: str = "left",
        add_special_tokens: bool = False,
        max_length: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pad `texts` to the longest one: (input_ids (B, T), attention_mask (B, T)), both int64.

        padding_side="left" for generation (each row ends with its last real token), "right" for training
        and encoders. max_length keeps the first max_length tokens of each text. Pad positions hold
        pad_token_id (0 if the tokenizer has neither pad nor eos) and mask 0.
        """
        if padding_side not in ("left", "right"):
            raise ValueError(f"encode_batch: padding_side={padding_side!r}; expected 'left' or 'right'")
        if isinstance(texts, str) or not texts:
            raise ValueError("encode_batch: expected a non-empty list of strings")
        rows = [e.ids for e in self.inner.encode_batch(list(texts), add_special_tokens=add_special_tokens)]
        if max_length is not None:
            rows = [row[:max_length] for row in rows]
        width = max(len(row) for row in rows)
        pad = self.pad_token_id if self.pad_token_id is not None else 0
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
        for b, row in enumerate(rows):
            if not row:
                continue
            span = slice(width - len(row), width) if padding_side == "left" else slice(0, len(row))
            input_ids[b, span] = torch.tensor(row, dtype=torch.long)
            attention_mask[b, span] = 1
        return input_ids, attention_mask

    # ---- vocabulary ----------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.inner.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.inner.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.inner.id_to_token(token_id)

    @property
    def special_ids(self) -> set[int]:
        """Ids of every special token: the added tokens marked special, plus bos/eos/pad/unk/mask/cls/sep."""
        ids = {i for i, added in self.inner.get_added_tokens_decoder().items() if added.special}
        return ids | {i for i in (getattr(self, f"{role}_token_id") for role in SPECIAL_ROLES) if i is not None}

    # ---- chat ----------------------------------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render a conversation [{"role", "content"}, ...] in ChatML, as the model's chat template would."""
        if not self.chat_template:
            raise ValueError("apply_chat_template: this tokenizer has no chat template; format the prompt yourself")
        if "<|im_start|>" not in self.chat_template:
            raise ValueError("apply_chat_template: the chat template is not ChatML (<|im_start|>role ...); minift "
                             "renders ChatML only, without jinja. Format the prompt yourself")
        if not messages:
            raise ValueError("apply_chat_template: the conversation is empty; give at least one message")
        for index, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                    or not isinstance(message.get("content"), str):
                raise ValueError(f"apply_chat_template: message #{index} must be a dict with string 'role' and "
                                 f"'content', got {message!r}")
        default_system = CHATML_DEFAULT_SYSTEM.search(self.chat_template)
        parts = []
        if messages[0]["role"] != "system" and default_system:
            parts.append(f"<|im_start|>system\n{default_system.group('text')}<|im_end|>\n")
        parts += [f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages]
        if add_generation_prompt:
            parts.append("<|im_start|>assistant\n")
        return "".join(parts)

    # ---- saving --------------------------------------------------------------------------------------

    def save(self, directory: str | Path) -> Path:
        """Write tokenizer.json and tokenizer_config.json, loadable by `transformers.AutoTokenizer`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / "tokenizer.json.tmp"
        self.inner.save(str(tmp))
        os.replace(tmp, directory / "tokenizer.json")
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
        for role in SPECIAL_ROLES:
            token_id = getattr(self, f"{role}_token_id")
            if token_id is not None:
                config[f"{role}_token"] = self.inner.id_to_token(token_id)
        if self.chat_template:
            config["chat_template"] = self.chat_template
        tmp = directory / "tokenizer_config.json.tmp"
        tmp.write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, directory / "tokenizer_config.json")
        return directory

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token_id}, eos={self.eos_token_id}, "
                f"pad={self.pad_token_id}, chat_template={'yes' if self.chat_template else 'no'})")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None
    return data if isinstance(data, dict) else {}


def _token_content(value) -> str | None:
    """A special token as written in the config files: a plain string or an AddedToken dict {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None

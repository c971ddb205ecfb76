"""Soft prompt tuning (Lester et al. 2021): learn n input vectors, keep every weight of the model frozen.

Lesson
------
A text prompt steers a frozen model with tokens chosen from the vocabulary. Prompt tuning (Lester, Al-Rfou
& Constant, "The Power of Scale for Parameter-Efficient Prompt Tuning", §2) lets gradient descent choose the
prompt instead, in embedding space: n "virtual tokens" P (n, d) are put in front of the embedded input,
and P is all that trains (n x d numbers: 20 x 576 = 11,520 for SmolLM2-135M).

    input ids            t0   t1   t2                    (B, T)
    embeddings   P0 P1 P2 e0   e1   e2                    (B, n + T, d)   P: the soft prompt, trainable
    positions    0  1  2  3    4    5                    real tokens shift by n
    attention    1  1  1  m0   m1   m2                    the mask grows by n ones (virtual tokens are real)
    blocks ...   (frozen)
    outputs      -- -- -- y0   y1   y2                    the n virtual positions are cut off again

Cutting the virtual positions off the output means every caller (the trainer, evaluation, generate) sees
(B, T, ...) as before, and the loss never looks at a virtual token. If you keep them
(keep_virtual_outputs=True), give them label -100 with `extend_labels`: same loss whenever the first label is
already -100 (a prompt token, a BOS); otherwise the last virtual token learns to predict the first real one.

Initialisation (§3.2): "vocab" copies the embeddings of n tokens drawn from the 5,000 most common ones
(we take ids below 5,000: BPE vocabularies number tokens roughly by merge order, i.e. frequency); "text"
copies the embeddings of a task description's tokens (repeated to fill n, as PEFT does); "random" draws
uniform in [-0.5, 0.5] as in the paper, which is far larger than the embeddings of most small models
(std 0.02), and the paper finds it the weakest. Lester et al. train P with a large learning rate (0.3).

How it is inserted without touching model.py (and without an `inputs_embeds` argument): three hooks, all
bound methods of the `SoftPrompt` module registered as `model.soft_prompt`:

    before the model   prepend n placeholder ids, extend attention_mask / position_ids / token_type_ids;
                       with a KV cache: grow the cache by n, and on later steps shift positions and mask
    after model.embed  replace the placeholders' embeddings with P
    after the model    drop the n virtual positions from the output

Models with learned absolute positions (GPT-2, BERT) add position embeddings 0..n-1 to P, a fixed offset that
training absorbs; they read at most max_seq_len - n real tokens.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch
import torch.nn as nn

from minift.adapter_interface import AdapterLayer
from minift.peft.freezing import TrainableReport, set_trainable, trainable_report

IGNORE_INDEX = -100
INITS = ("vocab", "text", "random")
COMMON_TOKENS = 5000  # Lester et al. sample "vocab" inits from the 5,000 most common tokens
PROMPT_FILE = "soft_prompt.safetensors"


class SoftPrompt(AdapterLayer):
    """n trainable virtual-token embeddings (`weight`, (n, d)) and the hooks that put them in front of inputs."""

    adapter_kind = "prompt"
    foldable = False  # extra input positions: no weight of the model can absorb them (merged() is None)

    def __init__(self, n_tokens: int, dim: int, causal: bool = True, keep_virtual_outputs: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n_tokens, dim))  # (n, d)
        self.n_tokens, self.causal = n_tokens, causal
        self.keep_virtual_outputs = keep_virtual_outputs
        self.inserting = False  # True between "before the model" and "after the model" of a prompted call
        self.enabled = True  # False: all three hooks pass through, the model sees the caller's tokens only

    # ---- the adapter interface (minift/adapter_interface.py) -----------------------------------------

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {"weight": self.weight}

    def set_adapter_enabled(self, enabled: bool) -> None:
        self.enabled = bool(enabled)

    def adapter_enabled(self) -> bool:
        return self.enabled

    def extra_repr(self) -> str:
        return f"n_tokens={self.n_tokens}, dim={self.weight.size(1)}"

    # ---- hook 1: before the model -------------------------------------------------------------------

    def before_model(self, model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Rewrite the forward arguments so the model sees n extra tokens in front (or, with a KV cache
        that already holds them, knows they are there)."""
        if not self.enabled:
            self.inserting = False
            return None  # arguments unchanged
        call = inspect.signature(model.forward).bind(*args, **kwargs).arguments  # name -> value
        ids, cache = call["input_ids"], call.get("cache")
        n = self.n_tokens
        B, T = ids.shape
        past = cache.length if cache is not None else 0
        mask, positions = call.get("attention_mask"), call.get("position_ids")
        self.inserting = past == 0
        if not self.inserting:  # a later decoding step: the prompt is already in the cache
            if mask is not None and mask.dim() == 2 and mask.size(1) == past + T - n:
                call["attention_mask"] = torch.cat([mask.new_ones(B, n), mask], dim=1)  # (B, past + T)
            if positions is not None:
                call["position_ids"] = positions + n
            return (), call
        if cache is not None:  # the caller sized the cache for its own tokens: make room for n more
            grow = list(cache.k.shape)
            grow[3] = n
            cache.k = torch.cat([cache.k, cache.k.new_zeros(grow)], dim=3)
            cache.v = torch.cat([cache.v, cache.v.new_zeros(grow)], dim=3)
        call["input_ids"] = torch.cat([ids.new_zeros(B, n), ids], dim=1)  # (B, n + T), placeholders first
        if mask is not None:
            call["attention_mask"] = self.extend_mask(mask)
        if positions is not None:
            virtual = torch.arange(n, device=positions.device).expand(B, n)  # (B, n)
            call["position_ids"] = torch.cat([virtual, positions + n], dim=1)  # (B, n + T)
        if call.get("token_type_ids") is not None:
            call["token_type_ids"] = torch.cat([call["token_type_ids"].new_zeros(B, n), call["token_type_ids"]], 1)
        return (), call

    def extend_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """A (B, T) padding mask gets n ones in front; a boolean (B, 1, T, T) mask of packed rows becomes
        (B, 1, n + T, n + T): every real token may see every virtual token, virtual tokens see only each
        other (causally in a decoder)."""
        n = self.n_tokens
        if mask.dim() == 2:
            return torch.cat([mask.new_ones(mask.size(0), n), mask], dim=1)  # (B, n + T)
        if mask.dim() != 4:
            raise ValueError(f"prompt tuning: attention_mask must be (B, T) or (B, 1, T, T), got {tuple(mask.shape)}")
        B, _, T, S = mask.shape
        if S != T:
            raise ValueError("prompt tuning: a 4-D attention mask with cached positions is not supported")
        full = torch.zeros(B, 1, n + T, n + T, dtype=torch.bool, device=mask.device)  # (B, 1, n+T, n+T)
        virtual = torch.ones(n, n, dtype=torch.bool, device=mask.device)
        full[:, :, :n, :n] = virtual.tril() if self.causal else virtual
        full[:, :, n:, :n] = True
        full[:, :, n:, n:] = mask.bool()
        return full

    # ---- hook 2: after the token embedding -----------------------------------------------------------

    def after_embed(self, embed: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if not self.inserting:
            return output
        B = output.size(0)
        prompt = self.weight.to(output.dtype).unsqueeze(0).expand(B, -1, -1)  # (B, n, d)
        return torch.cat([prompt, output[:, self.n_tokens:]], dim=1)  # (B, n + T, d)

    # ---- hook 3: after the model ---------------------------------------------------------------------

    def after_model(self, model: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        inserted, self.inserting = self.inserting, False
        if not inserted or self.keep_virtual_outputs:
            return output
        return output[:, self.n_tokens:]  # (B, T, V) or (B, T, d): the caller's own positions only


# ----------------------------------------------------------------------------------------------------
# Adding and removing
# ----------------------------------------------------------------------------------------------------


def initial_prompt(model: nn.Module, n_tokens: int, init: str, token_ids: list[int] | None = None,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """The starting value of P (n, d) for the chosen init (see the module docstring)."""
    table = model.embed.weight.detach()  # (V, d)

    def rows(ids: torch.Tensor) -> torch.Tensor:  # what the embedding module outputs (Gemma: rows x sqrt(d)), as
        with torch.no_grad():  # PEFT takes them; .forward skips the prompt's own hooks
            return model.embed.forward(ids.to(table.device)).detach().clone()  # (n, d)

    if init == "random":
        return torch.rand(n_tokens, table.size(1), generator=generator).to(table) - 0.5  # (n, d) in [-0.5, 0.5)
    if init == "vocab":
        pool = min(COMMON_TOKENS, table.size(0))
        if n_tokens <= pool:
            ids = torch.randperm(pool, generator=generator)[:n_tokens]  # n distinct tokens
        else:  # a tiny vocabulary: draw with replacement
            ids = torch.randint(pool, (n_tokens,), generator=generator)
        return rows(ids)  # (n, d)
    if not token_ids:
        raise ValueError("prompt tuning: init = 'text' needs the text's token ids (pass text= and tokenizer=, "
                         "or token_ids=)")
    bad = [i for i in token_ids if not 0 <= int(i) < table.size(0)]
    if bad:
        raise ValueError(f"prompt tuning: init token ids {bad[:5]} are outside the vocabulary (size {table.size(0)})")
    repeats = -(-n_tokens // len(token_ids))  # ceil: repeat the text to fill n tokens, then cut
    return rows(torch.tensor((list(token_ids) * repeats)[:n_tokens]))  # (n, d)


def add_prompt_tuning(model: nn.Module, n_tokens: int = 20, init: str = "vocab", text: str | None = None,
                      tokenizer=None, token_ids: list[int] | None = None, keep_virtual_outputs: bool = False,
                      generator: torch.Generator | None = None) -> TrainableReport:
    """Freeze `model` and put a trainable soft prompt of `n_tokens` virtual tokens in front of every input.

    init: "vocab" | "random" | "text" (with text + tokenizer, or token_ids). The prompt is `model.soft_prompt`.
    """
    if not hasattr(model, "embed") or not hasattr(model, "blocks"):
        raise ValueError(f"add_prompt_tuning: expected a minift Transformer, got {type(model).__name__}")
    if isinstance(getattr(model, "soft_prompt", None), SoftPrompt):
        raise ValueError("add_prompt_tuning: the model already has a soft prompt; remove_prompt_tuning(model) first")
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens <= 0:
        raise ValueError(f"prompt tuning: n_tokens must be a positive integer, got {n_tokens!r}")
    if init not in INITS:
        raise ValueError(f"prompt tuning: init = {init!r}; expected one of {', '.join(INITS)}")
    if text is not None:
        if tokenizer is None:
            raise ValueError("prompt tuning: init text given without a tokenizer to encode it")
        token_ids = tokenizer.encode(text)
    set_trainable([model], False)
    prompt = SoftPrompt(n_tokens, model.config.dim, causal=model.config.causal,
                        keep_virtual_outputs=keep_virtual_outputs)
    prompt.to(device=model.embed.weight.device, dtype=model.embed.weight.dtype)
    with torch.no_grad():
        prompt.weight.copy_(initial_prompt(model, n_tokens, init, token_ids, generator))
    model.soft_prompt = prompt
    model.register_forward_pre_hook(prompt.before_model, with_kwargs=True)
    model.embed.register_forward_hook(prompt.after_embed)
    model.register_forward_hook(prompt.after_model, with_kwargs=True)
    return trainable_report(model)


def remove_prompt_tuning(model: nn.Module) -> None:
    """Remove the soft prompt and its hooks: the model is the base model again (its weights never changed)."""
    for module in (model, model.embed):
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for key, hook in list(hooks.items()):
                if isinstance(getattr(hook, "__self__", None), SoftPrompt):
                    del hooks[key]  # keys are unique hook ids: drop the same id from the bookkeeping dicts
                    module._forward_pre_hooks_with_kwargs.pop(key, None)
                    module._forward_hooks_with_kwargs.pop(key, None)
    if hasattr(model, "soft_prompt"):
        del model.soft_prompt


def extend_labels(labels: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """(B, T) labels -> (B, n + T) with -100 for the virtual tokens, for outputs that keep them."""
    return torch.cat([labels.new_full((labels.size(0), n_tokens), IGNORE_INDEX), labels], dim=1)


# ----------------------------------------------------------------------------------------------------
# Files: the prompt is one (n, d) tensor
# ----------------------------------------------------------------------------------------------------


def write_prompt_files(model: nn.Module, directory: str | Path) -> Path:
    """Write soft_prompt.safetensors (the (n, d) tensor, n in the metadata) into `directory`
    (minift.peft.save_adapter calls this)."""
    from minift.io.files import write_safetensors_atomic

    if not hasattr(model, "soft_prompt"):
        raise ValueError("save_adapter: the model has no soft prompt (call add_prompt_tuning first)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weight = model.soft_prompt.weight.detach().cpu().contiguous()
    write_safetensors_atomic({"soft_prompt.weight": weight}, directory / PROMPT_FILE,
                             metadata={"method": "prompt_tuning", "n_tokens": str(weight.size(0)),
                                       "keep_virtual_outputs": json.dumps(model.soft_prompt.keep_virtual_outputs)})
    return directory


def read_prompt_files(model: nn.Module, directory: str | Path) -> TrainableReport:
    """Add the soft prompt saved in `directory` to a base model (minift.peft.load_adapter calls this)."""
    from minift.io.files import read_safetensors_with_metadata

    path = Path(directory) / PROMPT_FILE
    tensors, metadata = read_safetensors_with_metadata(
        path, floating=True, missing="expected a directory written by minift.peft.save_adapter")
    if "soft_prompt.weight" not in tensors:
        raise ValueError(f"{path}: no tensor named 'soft_prompt.weight'")
    weight = tensors["soft_prompt.weight"]
    if weight.dim() != 2 or weight.size(0) == 0 or weight.size(1) != model.config.dim:
        raise ValueError(f"{path}: soft prompt of shape {tuple(weight.shape)} does not fit a model of width "
                         f"{model.config.dim}")
    keep = metadata.get("keep_virtual_outputs", "false")
    if keep not in ("true", "false"):
        raise ValueError(f"{path}: metadata keep_virtual_outputs is {keep!r}; expected \"true\" or \"false\"")
    report = add_prompt_tuning(model, weight.size(0), init="random", keep_virtual_outputs=json.loads(keep))
    with torch.no_grad():
        model.soft_prompt.weight.copy_(weight)
    return report

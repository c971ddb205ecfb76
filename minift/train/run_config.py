"""Run configuration: what `minift finetune` reads from a TOML file, as dataclasses — one per concern.

Lesson
------
A fine-tuning run is decided by five groups of settings, each a dataclass whose fields are documented
where they are declared (so `help(TrainConfig)` is the manual):

    [model]   which checkpoint to start from             ModelSection
    [task]    what is learned, which decides the head    TaskSection
              (causal LM, masked LM, classification; from preferences: reward model, DPO, GRPO, PPO)
    [data]    which records, in which format, how long   DataSection
    [train]   the optimisation loop                      TrainConfig
    [method]  which weights train: "full", or an adapter method ("lora", ...) with its options

A TOML file fills these in; `--set section.field=value` changes one field from the command line,
converted to the field's declared type (int, float, bool, str, a list, or None), and an unknown section
or field is an error that lists what exists (minift/train/fields.py). Then every field is checked against
its range, in the small table of rules that follows each section (`validate_run_config`, run again by
setup() for configs built in code): `train.log_every = 0; must be >= 1`, naming the file or `--set`.
`[method]` works the same way, except that its fields depend on `name`: every key other than `name` is an
option of that method, declared by the method's own options dataclass in the registry
(minift/train/methods.py) and checked when the file is read, before any model is loaded.

    [train]                                  --set train.lr=3e-4 --set train.max_steps=100
    lr = 1e-4                                --set data.train=my.jsonl --set method.r=16
    max_steps = 500

Relative paths inside a TOML file are relative to that file; paths given with --set are relative to the
current directory. The resolved configuration (absolute paths) is written to the run directory as
`config.toml`, so a run can always be repeated or resumed from its own folder.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minift.dtypes import DTYPES
from minift.schedules import SCHEDULES
from minift.train.fields import check_field, coerce, field_names, field_type, suggest
from minift.train.methods import METHODS, parse_method_options
from minift.align.dpo import LOSS_TYPES
from minift.train.preference_tasks import PAIR_KINDS, check_task_options
from minift.train.rl_tasks import RL_KINDS, check_rl_options
from minift.train.tasks import TASK_KINDS

# ----------------------------------------------------------------------------------------------------
# Range rules: each section's table follows its dataclass; validate_run_config applies them all
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """Which values a field accepts: test(value) is True for those, `text` says which they are ("must be ...").
    None passes without a test wherever the field's type allows it (None = "off" / "not set")."""

    test: Callable[[Any], bool]
    text: str
    choices: tuple = ()  # for one_of: a misspelt value gets "did you mean ...?"
    aliases: tuple = ()  # for one_of: (other name, our name) pairs, e.g. ("dpo", "preference"): "... is called ..."


def at_least(low, note: str = "") -> Rule:
    return Rule(lambda v: v >= low, f">= {low}{note}")


def above(low, note: str = "") -> Rule:
    return Rule(lambda v: v > low, f"> {low}{note}")


def interval(low, high, closed: str = "[)", note: str = "") -> Rule:
    """low..high with "[" / "]" closed ends and "(" / ")" open ones, as written in maths."""
    lower = (lambda v: v >= low) if closed[0] == "[" else (lambda v: v > low)
    upper = (lambda v: v <= high) if closed[1] == "]" else (lambda v: v < high)
    return Rule(lambda v: lower(v) and upper(v), f"in {closed[0]}{low}, {high}{closed[1]}{note}")


def one_of(choices, aliases: dict[str, str] | None = None) -> Rule:
    choices = tuple(choices)
    return Rule(lambda v: v in choices, f"one of {', '.join(choices)}", choices, tuple((aliases or {}).items()))


def torch_device(name: str) -> bool:
    """"auto", or a device string torch can parse ("cpu", "cuda", "cuda:1", "mps"); present or not is setup's job."""
    import torch

    if name == "auto":
        return True
    try:
        torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        return False
    return True


NOT_EMPTY = Rule(lambda v: bool(v.strip()), "a non-empty string")
DROPOUT = interval(0, 1, "[)")  # a rate of 1 would drop everything
LABEL_NAMES = Rule(lambda v: len(v) >= 2 and len(set(v)) == len(v) and all(name.strip() for name in v),
                   "at least 2 distinct, non-empty label names")
CAUSAL_LM_FORMATS = ("text", "prompt_completion", "alpaca", "chat")  # masked_lm and classification have one each
PRECISIONS = ("fp32", "bf16", "fp16")
POOLINGS = ("mean", "cls", "last")  # as minift/losses.py pool()
EARLY_STOPPING_METRICS = ("eval_loss", "eval_perplexity", "eval_accuracy")


@dataclass
class ModelSection:
    """[model]: the starting checkpoint."""

    source: str = "smollm2-135m"  # bundled name (smollm2-135m, minilm-l6), a .gguf file, or a Hugging Face directory
    dtype: str = "float32"  # weights as loaded: float32 | bfloat16 | float16 (mixed precision is train.precision)
    dropout: float | None = None  # replaces the checkpoint's dropout rate (BERT fine-tuning uses 0.1); None keeps it


MODEL_RULES = {"source": NOT_EMPTY, "dtype": one_of(DTYPES), "dropout": DROPOUT}


@dataclass
class TaskSection:
    """[task]: what the model learns, which decides the head and the loss."""

    kind: str = "causal_lm"  # causal_lm (next token) | masked_lm (BERT's cloze) | classification (one label per text)
    #                          | reward | preference (DPO) | grpo | ppo (README "Learning from preferences")
    labels: list[str] | None = None  # classification: label names in order; None = the sorted labels of the train set
    pooling: str | None = None  # classification: mean | cls | last; None = mean for encoders, last for decoders
    head_dropout: float = 0.0  # classification: dropout before the classifier, in [0, 1)
    mlm_probability: float = 0.15  # masked_lm: share of (non-special) tokens selected for prediction, in (0, 1)
    # reward and preference (DPO) tasks: data records are {prompt, chosen, rejected} (minift/train/preference_tasks.py)
    beta: float = 0.1  # preference: DPO's beta, the strength of the pull to the reference, > 0
    loss_type: str = "sigmoid"  # preference: sigmoid (DPO) | robust (rDPO) | ipo
    label_smoothing: float = 0.0  # preference: cDPO's label-flip rate, in [0, 0.5)
    precompute_reference: bool = False  # preference: score every pair under the reference once, at setup
    center_rewards_coefficient: float | None = None  # reward: adds coef * (r_chosen + r_rejected)^2 per pair
    # grpo and ppo: records are {"prompt": ...}; beta is the KL coefficient (GRPO's beta, PPO's kl_coef), >= 0
    reward_model: str | None = None  # grpo/ppo: a reward model directory (a kind = "reward" run's final/)
    reward_function: str | None = None  # grpo/ppo: "module:function", f(prompts, completions) -> list of floats
    group_size: int = 4  # grpo: completions sampled per prompt (G), >= 2
    max_new_tokens: int = 32  # grpo/ppo: the longest completion, in tokens
    temperature: float = 1.0  # grpo/ppo: sampling temperature, > 0; log-probs are of logits / temperature (TRL)
    top_k: int | None = None  # grpo/ppo: sample among the k likeliest tokens; None = all
    top_p: float | None = None  # grpo/ppo: nucleus sampling, in (0, 1]; None = off
    clip_range: float = 0.2  # grpo/ppo: the ratio pi / pi_old is clipped to [1 - clip_range, 1 + clip_range]
    num_iterations: int = 1  # grpo: optimizer steps on each rollout (GRPO's mu, TRL's num_iterations)
    ppo_epochs: int = 4  # ppo: passes over each rollout
    num_minibatches: int = 1  # ppo: optimizer steps per pass (each of grad_accum_steps x batch_size sequences)
    gamma: float = 1.0  # ppo: discount of GAE, in [0, 1]
    lam: float = 0.95  # ppo: lambda of GAE, in [0, 1]
    vf_coef: float = 0.1  # ppo: weight of the value loss
    clip_range_value: float = 0.2  # ppo: the value prediction is clipped to old value +- this
    target_kl: float | None = None  # ppo: adaptive KL coefficient aiming at this KL per sequence; None = fixed beta
    kl_horizon: int = 10000  # ppo: adaptive KL's horizon (Ziegler et al. 2019), in sequences


# what other libraries and papers call our task kinds (TRL: DPO, RM; "SFT" is next-token training)
TASK_ALIASES = {"dpo": "preference", "ipo": "preference", "rm": "reward", "sft": "causal_lm", "clm": "causal_lm",
                "lm": "causal_lm", "mlm": "masked_lm", "cls": "classification", "rlhf": "ppo"}
TASK_RULES = {"kind": one_of(TASK_KINDS + PAIR_KINDS + RL_KINDS, TASK_ALIASES), "labels": LABEL_NAMES, "pooling": one_of(POOLINGS),
              "head_dropout": DROPOUT, "mlm_probability": interval(0, 1, "()"), "beta": at_least(0),
              "loss_type": one_of(LOSS_TYPES), "label_smoothing": interval(0, 0.5, "[)"),
              "center_rewards_coefficient": at_least(0), "reward_model": NOT_EMPTY, "reward_function": NOT_EMPTY,
              "group_size": at_least(1), "max_new_tokens": at_least(1), "temperature": above(0), "top_k": at_least(1),
              "top_p": interval(0, 1, "(]"), "clip_range": above(0), "ppo_epochs": at_least(1),
              "num_iterations": at_least(1),
              "num_minibatches": at_least(1), "gamma": interval(0, 1, "[]"), "lam": interval(0, 1, "[]"),
              "vf_coef": at_least(0), "clip_range_value": above(0), "target_kl": above(0), "kl_horizon": at_least(1)}


@dataclass
class DataSection:
    """[data]: the records and how they become token ids."""

    train: str = ""  # .jsonl or .csv file, or a bundled dataset: "tweet-sentiment", "fortunes"
    validation: str | None = None  # same kinds; None = hold out `validation_fraction` of the train records
    validation_fraction: float = 0.1  # used only without a validation file; in [0, 1), 0 = no validation
    format: str = "text"  # causal_lm records: text | prompt_completion | alpaca | chat
    text_field: str = "text"  # field holding the text (text format, masked_lm, classification)
    label_field: str = "label"  # classification: field holding the label
    max_length: int = 256  # tokens per example; longer examples are truncated
    max_examples: int | None = None  # use a seeded random N of the train records (kept in file order)
    max_eval_examples: int | None = None  # use a seeded random N of the validation records (0 = no validation)
    group_by_length: bool = False  # batch examples of similar length together (less padding)
    packing: bool = False  # causal_lm: concatenate examples into rows of max_length, attention kept per example


DATA_RULES = {"train": NOT_EMPTY, "validation": NOT_EMPTY, "validation_fraction": interval(0, 1, "[)"),
              "format": one_of(CAUSAL_LM_FORMATS), "text_field": NOT_EMPTY, "label_field": NOT_EMPTY,
              "max_length": at_least(1), "max_examples": at_least(1), "max_eval_examples": at_least(0)}


@dataclass
class TrainConfig:
    """[train]: the loop in minift/train/loop.py. Steps count optimizer updates, not micro-batches."""

    output_dir: str = "runs/finetune"  # config.toml, metrics.jsonl, training.svg, checkpoints/, final/
    seed: int = 0  # fixes everything: weight init of new heads, data order, dropout, masking; 0 <= seed < 2**63
    device: str = "auto"  # auto (cuda if available, else cpu) | cpu | cuda | cuda:1 ...
    precision: str = "fp32"  # fp32 | bf16 (autocast, CPU or GPU) | fp16 (autocast + grad scaler, GPU only)
    batch_size: int = 8  # examples per micro-batch
    grad_accum_steps: int = 1  # micro-batches per optimizer step; the loss is divided by their total target count
    max_steps: int | None = None  # optimizer steps; None = epochs x steps per epoch
    epochs: float = 1.0  # passes over the train set, when max_steps is None
    lr: float = 2e-5  # peak learning rate (of the top layer group with discriminative LRs)
    weight_decay: float = 0.0  # AdamW decoupled weight decay; never applied to biases and norm weights
    adam_beta1: float = 0.9  # decay of the first moment, in [0, 1)
    adam_beta2: float = 0.999  # decay of the second moment, in [0, 1)
    adam_eps: float = 1e-8  # > 0: added to the root of the second moment
    schedule: str = "constant"  # constant | warmup_cosine | slanted_triangular (ULMFiT), see minift/schedules.py
    warmup_steps: int = 0  # warmup_cosine: linear warm-up steps before the cosine decay
    cut_frac: float = 0.1  # slanted_triangular: fraction of steps spent increasing the LR, in (0, 1)
    stlr_ratio: float = 32.0  # slanted_triangular: how much smaller the lowest LR is than the peak, >= 1
    discriminative_factor: float = 1.0  # ULMFiT: each lower layer group gets lr / factor (2.6 in the paper); 1 = off
    layer_groups: int = 5  # ULMFiT: layer groups in all: the task head alone on top, embeddings + blocks cut into
    #                        N - 1 runs below it; the bottom group learns at lr / factor^(N-1) (minift/schedules.py)
    gradual_unfreezing: int = 0  # ULMFiT: unfreeze one more layer group (top down) every N steps; 0 = off
    max_grad_norm: float | None = 1.0  # clip the global gradient norm to this (> 0); None = no clipping
    gradient_checkpointing: bool = False  # recompute each block's activations in backward: less memory, ~30% slower
    optimizer_in_backward: bool = False  # AdamW-update each weight in backward as soon as its gradient is
    #   complete, then free that gradient (minift/train/optimizer_in_backward.py): less memory in full fine-tuning;
    #   needs max_grad_norm = none, grad_accum_steps = 1, no fp16, one process
    compile: bool = False  # torch.compile each transformer block (minift/train/compiled.py); the first steps compile,
    #                      their seconds are logged apart as compile_s and left out of tokens_per_s
    fused_loss: bool = True  # LM losses: lm_head + cross-entropy fused, chunk by chunk (minift/fused_loss.py): the
    #                          same loss and gradients without the (tokens x vocab) logits; false = the plain way
    eval_every: int = 0  # evaluate every N steps (and at the end); 0 = only at the end
    early_stopping_metric: str = "eval_loss"  # eval_loss | eval_perplexity | eval_accuracy
    early_stopping_patience: int = 0  # stop after N evaluations without improvement; 0 = never stop early
    log_every: int = 1  # append training metrics to metrics.jsonl every N steps
    save_every: int = 0  # write a checkpoint every N steps (and at the end); 0 = only at the end
    keep_checkpoints: int = 2  # how many recent checkpoints to keep on disk
    save_checkpoints: bool = True  # false: write no checkpoint at all (quick experiments; such a run cannot resume)
    export: bool = True  # at the end, write the fine-tuned model to output_dir/final (full: a Hugging Face dir)
    progress_bar: bool = True  # tqdm bar with loss, learning rate and tokens/s
    # divergence (minift/train/guards.py): stop with an error, exporting nothing, when the running mean of the loss
    # exceeds this factor x the mean loss of the first 3 steps, or when the trainable weights' norm exceeds 10 x this
    # factor x its start while the loss is no better than at step 1; 0 = off (NaN/inf gradients or weights always stop)
    divergence_factor: float = 10.0
    # several processes (minift/train/distributed.py), started by torchrun or `minift finetune CONFIG --nproc N`
    distributed: str = "auto"  # auto (ddp under torchrun with 2+ processes, else none) | none | ddp (a full copy
    #                            per rank, gradients all-reduced) | fsdp (weights, gradients, AdamW sharded per block)
    distributed_timeout: float = 600.0  # seconds a rank waits at a collective for the others before it stops
    fsdp_param_dtype: str = "float32"  # fsdp: the gathered weights' compute dtype (bfloat16 = mixed precision);
    #                                    shards, gradient reduction and AdamW stay float32


TRAIN_RULES = {
    "output_dir": NOT_EMPTY, "seed": Rule(lambda v: 0 <= v < 2**63, ">= 0 and < 2**63"),
    "device": Rule(torch_device, "auto or a device torch knows (cpu, cuda, cuda:1, mps)"),
    "precision": one_of(PRECISIONS), "batch_size": at_least(1), "grad_accum_steps": at_least(1),
    "max_steps": at_least(1, " (none = epochs x steps per epoch)"), "epochs": above(0), "lr": above(0),
    "weight_decay": at_least(0), "adam_beta1": interval(0, 1, "[)"), "adam_beta2": interval(0, 1, "[)"),
    "adam_eps": above(0), "schedule": one_of(SCHEDULES), "warmup_steps": at_least(0),
    "cut_frac": interval(0, 1, "()"), "stlr_ratio": at_least(1), "discriminative_factor": above(0),
    "layer_groups": at_least(1), "gradual_unfreezing": at_least(0, " (0 = off)"),
    "max_grad_norm": above(0, " (none turns clipping off)"), "eval_every": at_least(0, " (0 = only at the end)"),
    "early_stopping_metric": one_of(EARLY_STOPPING_METRICS), "early_stopping_patience": at_least(0),
    "log_every": at_least(1), "save_every": at_least(0, " (0 = only at the end)"), "keep_checkpoints": at_least(1),
    "divergence_factor": Rule(lambda v: v == 0 or v > 1, "0 (off) or a factor above 1"),
    "distributed": one_of(("auto", "none", "ddp", "fsdp")), "distributed_timeout": above(0),
    "fsdp_param_dtype": one_of(("float32", "bfloat16", "float16")),
}


@dataclass
class MethodSection:
    """[method]: which weights train. `name` picks an entry of minift.train.methods.METHODS; the other keys
    of the table are that method's options (e.g. r, alpha, targets for "lora"), typed by its options class."""

    name: str = "full"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    task: TaskSection = field(default_factory=TaskSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainConfig = field(default_factory=TrainConfig)
    method: MethodSection = field(default_factory=MethodSection)


SECTIONS = {f.name: f.default_factory for f in dataclasses.fields(RunConfig)}
RULES = {"model": MODEL_RULES, "task": TASK_RULES, "data": DATA_RULES, "train": TRAIN_RULES}  # [method]: the registry
PATH_FIELDS = {("model", "source"), ("data", "train"), ("data", "validation"), ("train", "output_dir"),
               ("task", "reward_model")}
BUNDLED_DATASETS = ("tweet-sentiment", "fortunes", "tweet-preferences", "tweet-prompts")  # names batches.py reads

# ----------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------


def load_run_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """Read a TOML file (or start from the defaults when `path` is None) and apply `key=value` overrides."""
    config = RunConfig()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: config file not found")
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: invalid TOML ({e})") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); TOML files are UTF-8") from None
        config = from_dict(raw, where=str(path), base_dir=path.parent)
    given_by = {}  # section.field -> "--set": a bad value given on the command line is reported as such
    for item in overrides:
        apply_override(config, item)
        given_by[item.split("=", 1)[0].strip()] = "--set"
    validate_run_config(config, where=str(path) if path is not None else "--set", given_by=given_by)
    return config


def validate_run_config(config: RunConfig, where: str = "config", given_by: dict[str, str] | None = None):
    """Check every field of every section, before anything is loaded; the first problem is a ValueError.

    Each value is converted to its declared type (a config built in code may hold "3" or 3 for a float), must be
    finite if it is a float, and must pass its section's rule (RULES); then the fields that depend on each
    other, then [method] against the registry. Errors read "<where>: section.field = value; must be ...",
    where `where` is the file, or `given_by[section.field]` ("--set") for a value given on the command line.
    Returns the method's typed options (validate_method).
    """
    given_by = given_by or {}
    for section, rules in RULES.items():
        target = getattr(config, section)
        for name in field_names(target):
            key = f"{section}.{name}"
            origin = given_by.get(key, where)
            value = coerce(getattr(target, name), field_type(target, name), f"{origin}: {key}")
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{origin}: {key} = {value}; must be a finite number")
            rule = rules.get(name)
            if value is not None and rule is not None and not rule.test(value):
                hint = ""
                if rule.choices and isinstance(value, str):
                    ours = dict(rule.aliases).get(value.lower())
                    hint = f" ({value!r} is called {ours!r} here)" if ours else suggest(value, rule.choices)
                raise ValueError(f"{origin}: {key} = {value!r}; must be {rule.text}{hint}")
            setattr(target, name, value)
    check_optimizer_in_backward(config.train, where, given_by)
    kind, metric = config.task.kind, config.train.early_stopping_metric
    # the metrics evaluate() reports that early stopping can compare (tasks.summarize, or a task's metric sums);
    # preference (DPO's accuracy is logged as eval_rewards/accuracies), grpo and ppo offer eval_loss alone
    reported = {"causal_lm": ("eval_loss", "eval_perplexity"), "masked_lm": ("eval_loss", "eval_perplexity"),
                "classification": ("eval_loss", "eval_accuracy"), "reward": ("eval_loss", "eval_accuracy")}
    check_task_options(config.task, where)
    check_rl_options(config.task, where)
    if metric not in reported.get(kind, ("eval_loss",)):
        origin = given_by.get("train.early_stopping_metric", where)
        offered = (" and ".join(reported[kind]) + "; use one of those") if kind in reported else \
            "eval_loss only; use eval_loss"
        raise ValueError(f"{origin}: train.early_stopping_metric = {metric!r}, but a {kind} task reports {offered}")
    return validate_method(config.method, where=given_by.get("method.name", where))


def check_optimizer_in_backward(train: TrainConfig, where: str, given_by: dict[str, str]) -> None:
    """train.optimizer_in_backward updates each weight during backward (minift/train/optimizer_in_backward.py):
    refuse what needs every gradient before the first update. (DDP/FSDP: minift/train/distributed.py.)"""
    if not train.optimizer_in_backward:
        return
    conflicts = [
        ("max_grad_norm", train.max_grad_norm is not None, "clipping needs the norm of all the gradients before "
         "any weight changes, and these weights change during backward; set train.max_grad_norm = none"),
        ("grad_accum_steps", train.grad_accum_steps > 1, "the gradients of every micro-batch would have to be "
         "kept until the update; set train.grad_accum_steps = 1 (and a larger train.batch_size)"),
        ("precision", train.precision == "fp16", "the fp16 grad scaler skips a step only after seeing every "
         "gradient; use bf16 or fp32"),
    ]
    for name, conflicting, reason in conflicts:
        if conflicting:
            origin = given_by.get(f"train.{name}", given_by.get("train.optimizer_in_backward", where))
            raise ValueError(f"{origin}: train.optimizer_in_backward = true with train.{name} = "
                             f"{getattr(train, name)!r}: {reason}")


def validate_method(method: MethodSection, where: str = "[method]"):
    """Check [method] against the registry; keeps the options as given, converted to their declared types.

    Returns the method's typed options instance (what the trainer hands to the method's prepare function).
    """
    parsed = parse_method_options(method.name, method.options, where)
    method.options = {key: getattr(parsed, key) for key in method.options}
    return parsed


def from_dict(raw: dict, where: str = "config", base_dir: Path | None = None) -> RunConfig:
    """Build a RunConfig from nested tables; unknown tables or keys are errors naming `where`."""
    config = RunConfig()
    for section, table in raw.items():
        if section not in SECTIONS:
            raise ValueError(f"{where}: unknown table [{section}]{suggest(section, SECTIONS)}; "
                             f"tables are {', '.join(f'[{s}]' for s in SECTIONS)}")
        if not isinstance(table, dict):
            raise ValueError(f"{where}: {section!r} must be a table [{section}], got {type(table).__name__}")
        target = getattr(config, section)
        for key, value in table.items():
            if section == "method" and key != "name":  # the method's own options: checked by validate_method
                target.options[key] = value
                continue
            check_field(target, section, key, where)
            value = coerce(value, field_type(target, key), f"{where}: {section}.{key}")
            if base_dir is not None and (section, key) in PATH_FIELDS and value:
                value = resolve_path(value, base_dir)
            setattr(target, key, value)
    return config


def apply_override(config: RunConfig, item: str) -> None:
    """Apply one `section.field=value` string (the text after --set) to `config`."""
    where = f"--set {item}"
    if "=" not in item:
        raise ValueError(f"{where}: expected section.field=value, e.g. train.lr=3e-4")
    key, text = item.split("=", 1)
    if "." not in key:
        raise ValueError(f"{where}: expected section.field=value, e.g. train.lr=3e-4")
    section, name = key.strip().split(".", 1)
    if section not in SECTIONS:
        raise ValueError(f"{where}: unknown section {section!r}{suggest(section, SECTIONS)}; "
                         f"sections are {', '.join(SECTIONS)}")
    target = getattr(config, section)
    if section == "method" and name != "name":  # the method's option: typed by its options class
        method = METHODS.get(target.name)
        known = method is not None and name in field_names(method.options)
        target.options[name] = coerce(text.strip(), field_type(method.options, name), where) if known else text.strip()
        return  # an unknown option is reported, with suggestions, by validate_method
    check_field(target, section, name, where)
    setattr(target, name, coerce(text.strip(), field_type(target, name), where))


def resolve_path(value: str, base_dir: Path) -> str:
    """Make a relative file path absolute against `base_dir`; bundled names pass through unchanged."""
    from minift.io.bundled import BUNDLED_NAMES

    if value in BUNDLED_NAMES or value in BUNDLED_DATASETS or Path(value).is_absolute():
        return value
    return str((base_dir / value).resolve())


# ----------------------------------------------------------------------------------------------------
# Writing (the resolved config goes into the run directory)
# ----------------------------------------------------------------------------------------------------


def to_toml(config: RunConfig) -> str:
    """TOML text that load_run_config reads back into an equal RunConfig (None fields are left out).

    Relative paths (relative to the current directory) are written as absolute ones, so the file means the
    same thing wherever it is read from.
    """
    lines = []
    for section in SECTIONS:
        values = dataclasses.asdict(getattr(config, section))
        if section == "method":
            values = {"name": values["name"], **values["options"]}
        for key in values:
            if (section, key) in PATH_FIELDS and values[key]:
                values[key] = resolve_path(values[key], Path.cwd())
        lines.append(f"[{section}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in values.items() if value is not None]
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise ValueError(f"cannot write {value!r} to TOML")

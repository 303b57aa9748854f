"""
BPE tokenizer: trained with rustbpe (GPT-4-style split pattern), served as a tiktoken Encoding
for fast encode/decode. Saved as JSON (pattern, base64 merge ranks, special tokens): no pickle.

Chat format (nanochat's):
  <|bos|> <|user_start|> ... <|user_end|> <|assistant_start|> ... <|assistant_end|> ...
Assistant tool calls: <|python_start|> expr <|python_end|> <|output_start|> result <|output_end|>
"""
from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Iterable, Iterator

import tiktoken
import torch

from nanochat.errors import ConfigError
from nanochat.files import atomic_torch_save, atomic_write_json

SPECIAL_TOKENS = [
    "<|bos|>",
    "<|user_start|>", "<|user_end|>",
    "<|assistant_start|>", "<|assistant_end|>",
    "<|python_start|>", "<|python_end|>",
    "<|output_start|>", "<|output_end|>",
]

# GPT-4's pattern, with numbers split into groups of at most two digits (nanochat's choice for
# small vocabularies: fewer tokens spent on number chunks).
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""

TOKENIZER_FILE = "tokenizer.json"
TOKEN_BYTES_FILE = "token_bytes.pt"


class Tokenizer:
    def __init__(self, enc: tiktoken.Encoding):
        self.enc = enc
        self.bos_token_id = enc.encode_single_token("<|bos|>")

    # -- training -------------------------------------------------------------------------
    @classmethod
    def train(cls, text_iterator: Iterable[str], vocab_size: int) -> "Tokenizer":
        import rustbpe
        n_merges_vocab = vocab_size - len(SPECIAL_TOKENS)
        if n_merges_vocab < 256:
            raise ConfigError(f"vocab_size={vocab_size} is too small: need at least {256 + len(SPECIAL_TOKENS)}")
        bpe = rustbpe.Tokenizer()
        bpe.train_from_iterator(iter(text_iterator), n_merges_vocab, pattern=SPLIT_PATTERN)
        ranks = {bytes(k): v for k, v in bpe.get_mergeable_ranks()}
        return cls(cls._make_encoding(SPLIT_PATTERN, ranks))

    @classmethod
    def byte_level(cls) -> "Tokenizer":
        """The 256 bytes and the special tokens, no merges: needs no training and no rustbpe (the lent GPU
        machine has none), so the GPU tests and gpu-check use it. Vocabulary 256 + len(SPECIAL_TOKENS)."""
        return cls(cls._make_encoding(SPLIT_PATTERN, {bytes([i]): i for i in range(256)}))

    @staticmethod
    def _make_encoding(pattern: str, ranks: dict[bytes, int]) -> tiktoken.Encoding:
        offset = len(ranks)
        special = {name: offset + i for i, name in enumerate(SPECIAL_TOKENS)}
        return tiktoken.Encoding(name="nanochat", pat_str=pattern, mergeable_ranks=ranks, special_tokens=special)

    # -- persistence ----------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        ranks = self.enc._mergeable_ranks
        payload = {
            "pattern": self.enc._pat_str,
            "special_tokens": SPECIAL_TOKENS,
            "mergeable_ranks": [[base64.b64encode(k).decode("ascii"), v] for k, v in sorted(ranks.items(), key=lambda kv: kv[1])],
        }
        atomic_write_json(directory / TOKENIZER_FILE, payload)
        atomic_torch_save(self.token_bytes(), directory / TOKEN_BYTES_FILE)
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "Tokenizer":
        path = Path(directory) / TOKENIZER_FILE
        try:
            payload = json.loads(path.read_text())
            ranks = {base64.b64decode(k): int(v) for k, v in payload["mergeable_ranks"]}
            pattern = payload["pattern"]
        except FileNotFoundError:
            raise ConfigError(f"{path}: tokenizer file not found (train one first)") from None
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{path}: corrupt tokenizer file ({e.__class__.__name__}: {e})") from None
        return cls(cls._make_encoding(pattern, ranks))

    def token_bytes(self) -> torch.Tensor:
        """Bytes per token id (0 for special tokens), for bits-per-byte evaluation."""
        n = self.enc.n_vocab
        out = torch.zeros(n, dtype=torch.int32)
        special = set(self.enc.special_tokens_set)
        for i in range(n):
            tok = self.enc.decode_single_token_bytes(i)
            if tok.decode("utf-8", errors="ignore") not in special:
                out[i] = len(tok)
        for name in special:
            out[self.enc.encode_single_token(name)] = 0
        return out

    # -- encoding -------------------------------------------------------------------------
    def get_vocab_size(self) -> int:
        return self.enc.n_vocab

    def get_bos_token_id(self) -> int:
        return self.bos_token_id

    def encode_special(self, name: str) -> int:
        return self.enc.encode_single_token(name)

    def encode(self, text, prepend: int | str | None = None, append: int | str | None = None, num_threads: int = 4):
        """Ordinary text only: text that looks like a special token is encoded as plain text.
        A list of strings encodes in a batch (threads)."""
        def _id(x):
            return x if isinstance(x, int) else self.encode_special(x)
        if isinstance(text, str):
            ids = self.enc.encode_ordinary(text)
            if prepend is not None:
                ids.insert(0, _id(prepend))
            if append is not None:
                ids.append(_id(append))
            return ids
        batch = self.enc.encode_ordinary_batch(list(text), num_threads=num_threads)
        for ids in batch:
            if prepend is not None:
                ids.insert(0, _id(prepend))
            if append is not None:
                ids.append(_id(append))
        return batch

    def decode(self, ids) -> str:
        return self.enc.decode(list(ids))

    # -- conversations --------------------------------------------------------------------
    def render_conversation(self, conversation: dict, max_tokens: int = 2048) -> tuple[list[int], list[int]]:
        """Conversation -> (ids, mask). mask=1 on tokens the assistant is trained to produce:
        its text, its tool calls and <|assistant_end|>; 0 on user text, tool outputs, scaffolding.
        A leading system message is folded into the first user message. Truncated to max_tokens."""
        messages = list(conversation["messages"])
        if messages and messages[0]["role"] == "system":
            if len(messages) < 2 or messages[1]["role"] != "user":
                raise ValueError("a system message must be followed by a user message")
            merged = dict(messages[1])
            merged["content"] = messages[0]["content"] + "\n\n" + messages[1]["content"]
            messages = [merged] + messages[2:]
        ids: list[int] = []
        mask: list[int] = []

        def add(tokens, m):
            if isinstance(tokens, int):
                tokens = [tokens]
            ids.extend(tokens)
            mask.extend([m] * len(tokens))

        sp = self.encode_special
        add(self.bos_token_id, 0)
        for i, message in enumerate(messages):
            role, content = message["role"], message["content"]
            expected = "user" if i % 2 == 0 else "assistant"
            if role != expected:
                raise ValueError(f"message {i} has role {role!r}, expected {expected!r} (roles alternate, user first)")
            if role == "user":
                if not isinstance(content, str):
                    raise ValueError("user content must be a string")
                add(sp("<|user_start|>"), 0)
                add(self.encode(content), 0)
                add(sp("<|user_end|>"), 0)
            else:
                add(sp("<|assistant_start|>"), 0)
                parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
                for part in parts:
                    kind, text = part["type"], part["text"]
                    if kind == "text":
                        add(self.encode(text), 1)
                    elif kind == "python":
                        add(sp("<|python_start|>"), 1)
                        add(self.encode(text), 1)
                        add(sp("<|python_end|>"), 1)
                    elif kind == "python_output":
                        add(sp("<|output_start|>"), 0)
                        add(self.encode(text), 0)
                        add(sp("<|output_end|>"), 0)
                    else:
                        raise ValueError(f"unknown content part type {kind!r}")
                add(sp("<|assistant_end|>"), 1)
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation: dict) -> list[int]:
        """Prompt ids for generation: the conversation without its last assistant turn (if any),
        then <|assistant_start|>."""
        messages = list(conversation["messages"])
        if messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        ids, _ = self.render_conversation({"messages": messages}, max_tokens=1 << 30)
        return ids + [self.encode_special("<|assistant_start|>")]


def iter_texts_for_training(texts: Iterable[str], max_chars: int, doc_cap: int = 10_000) -> Iterator[str]:
    """Yield documents (each capped at doc_cap chars) until max_chars have been yielded."""
    total = 0
    for text in texts:
        text = text[:doc_cap]
        total += len(text)
        yield text
        if total >= max_chars:
            return

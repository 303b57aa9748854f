"""Tokenizer: round trips, conversation masks, save/load."""
import pytest

from nanochat.errors import ConfigError
from nanochat.prepare import python_stdlib_documents
from nanochat.tokenizer import SPECIAL_TOKENS, TOKEN_BYTES_FILE, TOKENIZER_FILE, Tokenizer

VOCAB = 600


@pytest.fixture(scope="module")
def tok():
    # pydoc's topics only (max_chars small: the stdlib docstring pass stops at once)
    return Tokenizer.train(python_stdlib_documents(max_chars=1), VOCAB)


ROUND_TRIP = [
    "",
    "hello world",
    "  leading and trailing spaces  \n\n\t",
    "naïve café, Straße, Ελληνικά, русский, 日本語のテキスト, emoji 🤖🎉 and a zero-width\u200bjoiner",
    "numbers 1234567890 3.14159 -42 1e-7",
    "text that looks special: <|bos|> <|user_start|>hi<|user_end|> <|assistant_end|> <|python_start|>",
    "code: def f(x):\n    return x ** 2  # comment\r\n",
    "\x00\x01 control characters \ufffd",
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    specials = {tok.encode_special(s) for s in SPECIAL_TOKENS}
    assert not specials & set(ids), "ordinary text must never produce special token ids"


def test_vocab_and_batch_encode(tok):
    assert tok.get_vocab_size() == VOCAB
    batch = tok.encode(ROUND_TRIP, prepend="<|bos|>")
    for text, ids in zip(ROUND_TRIP, batch):
        assert ids[0] == tok.get_bos_token_id()
        assert tok.decode(ids[1:]) == text


def _conversation():
    return {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "USERTEXT what is 12*34?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "ASSISTANTTEXT using the tool"},
            {"type": "python", "text": "12*34"},
            {"type": "python_output", "text": "408"},
            {"type": "text", "text": "it is 408"},
        ]},
        {"role": "user", "content": "thanks"},
        {"role": "assistant", "content": "you are welcome"},
    ]}


def test_render_conversation_masks(tok):
    ids, mask = tok.render_conversation(_conversation())
    assert len(ids) == len(mask)
    sp = tok.encode_special
    supervised = tok.decode([i for i, m in zip(ids, mask) if m])
    unsupervised = tok.decode([i for i, m in zip(ids, mask) if not m])
    # assistant text, the tool call and <|assistant_end|> are trained on
    assert supervised == ("ASSISTANTTEXT using the tool<|python_start|>12*34<|python_end|>it is 408<|assistant_end|>"
                          "you are welcome<|assistant_end|>")
    # user text (with the folded system prompt), tool output and scaffolding are not
    assert unsupervised == ("<|bos|><|user_start|>Be brief.\n\nUSERTEXT what is 12*34?<|user_end|><|assistant_start|>"
                            "<|output_start|>408<|output_end|><|user_start|>thanks<|user_end|><|assistant_start|>")
    assert ids[0] == tok.get_bos_token_id() and mask[0] == 0
    assert ids.count(sp("<|assistant_start|>")) == 2


def test_render_truncation(tok):
    full_ids, full_mask = tok.render_conversation(_conversation())
    ids, mask = tok.render_conversation(_conversation(), max_tokens=12)
    assert len(ids) == 12 and ids == full_ids[:12] and mask == full_mask[:12]


def test_render_rejects_bad_roles(tok):
    with pytest.raises(ValueError):
        tok.render_conversation({"messages": [{"role": "assistant", "content": "hi"}]})


def test_save_load(tok, tmp_path):
    tok.save(tmp_path)
    assert (tmp_path / TOKENIZER_FILE).exists() and (tmp_path / TOKEN_BYTES_FILE).exists()
    loaded = Tokenizer.load(tmp_path)
    assert loaded.get_vocab_size() == tok.get_vocab_size()
    for text in ROUND_TRIP:
        assert loaded.encode(text) == tok.encode(text)
    assert loaded.render_conversation(_conversation()) == tok.render_conversation(_conversation())
    tb = loaded.token_bytes()
    assert tb[tok.get_bos_token_id()] == 0 and int(tb[tok.encode("the")[0]]) >= 1


def test_load_missing_or_corrupt(tmp_path):
    with pytest.raises(ConfigError, match=str(tmp_path)):
        Tokenizer.load(tmp_path)
    (tmp_path / TOKENIZER_FILE).write_text("{not json")
    with pytest.raises(ConfigError, match="corrupt"):
        Tokenizer.load(tmp_path)


def test_vocab_too_small():
    with pytest.raises(ConfigError, match="vocab_size"):
        Tokenizer.train(["abc"], 100)

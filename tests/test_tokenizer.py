"""Byte-level BPE: vocabulary, special ids, exact round trip, save/load, determinism, offline."""

from __future__ import annotations

import random
import socket

import pytest

from safelm.tokenizer import SPECIAL, Tokenizer

CORPUS = [f"the quick brown fox {i} jumps over the lazy dog; she sells sea shells {i % 7}"
          for i in range(150)] + ["naïve café über", "日本語のテキスト", "emoji 🙂🚀 here"]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(CORPUS, 400)


def random_strings(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    pools = [
        [chr(c) for c in range(32, 127)],  # ASCII
        [chr(c) for c in range(0, 32)] + ["\x7f", "\u200b", "\ufeff"],  # control / invisible
        list("日本語中文한국어テキスト漢字"),  # CJK
        ["🙂", "🚀", "👍🏽", "👨‍👩‍👧", "🇫🇷", "\U0001F600"],  # emoji incl. ZWJ and flags
        list("éüñçøßåλΩж") + ["e\u0301"],  # accents, combining marks
        [" ", "  ", "\t", "\n", "\r\n"],
    ]
    out = []
    for _ in range(n):
        k = rng.randrange(0, 30)
        out.append("".join(rng.choice(rng.choice(pools)) for _ in range(k)))
    return out


def random_byte_strings(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [bytes(rng.randrange(256) for _ in range(rng.randrange(0, 40))).decode(
        "utf-8", errors="replace") for _ in range(n)]


def test_vocab_size(tok):
    assert 256 < tok.vocab_size <= 400
    small = Tokenizer.train(["ab ab ab", "ba"], 300)
    assert 256 + len(SPECIAL) <= small.vocab_size <= 300


def test_special_ids(tok):
    ids = (tok.pad_id, tok.bos_id, tok.eos_id)
    assert ids == tuple(tok.hf.token_to_id(t) for t in SPECIAL)
    assert len(set(ids)) == 3 and all(0 <= i < tok.vocab_size for i in ids)
    # the special tokens decode to nothing (skipped)
    assert tok.decode([tok.bos_id, tok.pad_id, tok.eos_id]) == ""
    # and never come out of encoding ordinary text
    for s in CORPUS[:20] + random_strings(50, 1):
        assert not set(tok.encode(s)) & set(ids)


def test_all_256_bytes_in_vocab(tok):
    # byte-level: every single byte string is encodable without an unknown token
    for b in range(256):
        s = bytes([b]).decode("latin-1")
        assert tok.decode(tok.encode(s)) == s


@pytest.mark.parametrize("s", ["", " ", "hello world", "  leading and trailing  ",
                               "\x00\x01\x02\t\n\r\x1b[0m", "🙂🚀👨‍👩‍👧", "日本語のテキスト",
                               "mixed: naïve 日本 🙂 \u200b end", "\ufeffbom", "a\r\nb\n\n"])
def test_round_trip_fixed(tok, s):
    assert tok.decode(tok.encode(s)) == s


def test_round_trip_random_unicode(tok):
    bad = [s for s in random_strings(300, 0) if tok.decode(tok.encode(s)) != s]
    assert bad == []


def test_round_trip_random_bytes(tok):
    strings = random_byte_strings(300, 0)
    assert any("\ufffd" in s for s in strings)  # the generator does produce replacement chars
    bad = [s for s in strings if tok.decode(tok.encode(s)) != s]
    assert bad == []


def test_encode_batch_matches_encode(tok):
    strings = random_strings(50, 2) + CORPUS[:5]
    assert tok.encode_batch(strings) == [tok.encode(s) for s in strings]


def test_merges_compress_training_text(tok):
    # planted effect: frequent training text encodes in far fewer tokens than bytes ...
    s = CORPUS[0]
    assert len(tok.encode(s)) < 0.6 * len(s.encode("utf-8"))
    # ... control: random bytes unseen in training barely compress
    r = random_byte_strings(1, 5)[0] * 3
    assert len(tok.encode(r)) > 0.6 * len(r.encode("utf-8"))


@pytest.mark.parametrize("s", ["hello <eos> world", "a<pad>b", "<bos>"])
def test_special_token_text_is_plain_text(tok, s):
    ids = tok.encode(s)
    assert tok.eos_id not in ids and tok.pad_id not in ids and tok.bos_id not in ids
    assert tok.decode(ids) == s


def test_save_load_identical(tok, tmp_path):
    p = tmp_path / "tokenizer.json"
    tok.save(p)
    assert p.is_file() and not (tmp_path / "tokenizer.json.tmp").exists()
    loaded = Tokenizer.load(p)
    assert loaded.vocab_size == tok.vocab_size
    assert (loaded.pad_id, loaded.bos_id, loaded.eos_id) == (tok.pad_id, tok.bos_id, tok.eos_id)
    strings = CORPUS + random_strings(100, 3) + random_byte_strings(100, 3)
    assert loaded.encode_batch(strings) == tok.encode_batch(strings)
    assert all(loaded.decode(ids) == s for s, ids in zip(strings, loaded.encode_batch(strings)))


def test_training_is_deterministic(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    Tokenizer.train(CORPUS, 350).save(a)
    Tokenizer.train(CORPUS, 350).save(b)
    assert a.read_bytes() == b.read_bytes()
    # control: different text gives a different tokenizer
    c = tmp_path / "c.json"
    Tokenizer.train([s.upper() for s in CORPUS], 350).save(c)
    assert c.read_bytes() != a.read_bytes()


def test_sees_only_what_it_is_trained_on():
    # a word frequent in training is one token; a held-out word of the same length is not
    t = Tokenizer.train(["zebra " * 50, "other words here"], 300)
    assert len(t.encode(" zebra")) <= 2
    assert len(t.encode(" quokk")) > 2


def test_load_rejects_tokenizer_without_specials(tmp_path):
    from tokenizers import Tokenizer as HF
    from tokenizers import models
    p = tmp_path / "plain.json"
    HF(models.BPE()).save(str(p))
    with pytest.raises(ValueError, match="special tokens"):
        Tokenizer.load(p)


def test_no_network(monkeypatch, tmp_path):
    def refuse(*a, **k):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = Tokenizer.train(CORPUS[:30], 300)
    t.save(tmp_path / "t.json")
    t2 = Tokenizer.load(tmp_path / "t.json")
    assert t2.encode("the fox") == t.encode("the fox")


def test_no_hub_calls_in_source():
    # Rust-side downloads would bypass Python's socket: check no hub entry point is used at all
    import inspect

    import safelm.tokenizer as mod
    src = inspect.getsource(mod)
    assert "from_pretrained" not in src and "huggingface_hub" not in src

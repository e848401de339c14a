"""IncrementalDetokenizer: exact text, multi-byte characters, stop strings, streaming deltas.

Two tokenizers: the word-level test tokenizer of conftest (decode joins words with spaces,
so the first output word after a prompt carries its leading space), and a byte-level BPE
trained here on a few strings, whose tokens split multi-byte characters (and even end
one character and start the next).
"""
from __future__ import annotations

import random

import pytest

from disagg.engine.detokenizer import IncrementalDetokenizer
from disagg.model.tokenizer import Tokenizer
from conftest import write_tiny_tokenizer

BOS = 0
TRAIN = ["héllo wörld, ünïcode 日本語 テキスト 🙂👍 emoji ñandú €100",
         "hello world stop STOP done. the end"] * 3


@pytest.fixture(scope="module")
def word_tok(tmp_path_factory) -> Tokenizer:
    d = tmp_path_factory.mktemp("word_tok")
    write_tiny_tokenizer(str(d))
    return Tokenizer(str(d))


@pytest.fixture(scope="module")
def byte_tok(tmp_path_factory) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<eos>"])
    tok.train_from_iterator(TRAIN, trainer)
    d = tmp_path_factory.mktemp("byte_tok")
    tok.save(str(d / "tokenizer.json"))
    return Tokenizer(str(d))


def run(tok: Tokenizer, prompt: list[int], out: list[int], stop: tuple[str, ...] = ()):
    """Feed `out` one token at a time, streaming delta(final=False) after each; returns (d, deltas)."""
    d = IncrementalDetokenizer(tok, prompt, stop)
    deltas = []
    for t in out:
        d.add(t)
        deltas.append(d.delta(final=False))
        if d.stopped:
            break
    d.flush()
    deltas.append(d.delta(final=True))
    return d, deltas


# ---------------------------------------------------------------- exact text
def test_word_level_text_equals_decode(word_tok):
    rng = random.Random(0)
    for _ in range(50):
        out = [rng.randrange(1, 40) for _ in range(rng.randint(1, 15))]   # includes </s> (special) and <unk>
        d, deltas = run(word_tok, [BOS], out)
        assert d.text == word_tok.decode(out)
        assert "".join(deltas) == d.text


def test_word_level_text_continues_the_prompt(word_tok):
    prompt = [5, 6, 7, 8, 9, 10]
    out = [11, 12, 13]
    d, deltas = run(word_tok, prompt, out)
    assert d.text == " t11 t12 t13"
    assert word_tok.decode(prompt) + d.text == word_tok.decode(prompt + out)
    assert deltas == [" t11", " t12", " t13", ""]          # no stop strings: nothing held back


@pytest.mark.parametrize("s", ["日本語", "🙂👍 emoji", "héllo wörld, ünïcode", "ñandú €100 テキスト",
                               "plain ascii", "a🙂b日c"])
def test_byte_level_multibyte_text_is_exact_and_never_partial(byte_tok, s):
    prompt = byte_tok.encode("hello ")
    out = byte_tok.encode(s)
    assert any("\ufffd" in byte_tok.decode([t]) for t in out) or s.isascii()
    d = IncrementalDetokenizer(byte_tok, prompt)
    for k, t in enumerate(out, 1):
        d.add(t)
        assert "\ufffd" not in d.text                       # never streams half a character
        ref = byte_tok.decode(out[:k])
        assert ref.startswith(d.text)
        if not ref.endswith("\ufffd"):
            assert d.text == ref
    d.flush()
    assert d.text == s == byte_tok.decode(out)


def test_byte_level_random_tokens_match_decode(byte_tok):
    """Arbitrary ids (invalid UTF-8 included): after flush the text is exactly decode(out)."""
    rng = random.Random(1)
    prompt = byte_tok.encode("hello 日本")
    for _ in range(300):
        out = [rng.randrange(byte_tok.vocab_size) for _ in range(rng.randint(1, 12))]
        d, deltas = run(byte_tok, prompt, out)
        assert d.text == byte_tok.decode(out)
        assert "".join(deltas) == d.text


def test_flush_renders_a_trailing_partial_character(byte_tok):
    out = byte_tok.encode("日")[:1]                            # the first bytes of 日 only
    d = IncrementalDetokenizer(byte_tok, byte_tok.encode("x "))
    d.add(out[0])
    assert d.text == ""
    d.flush()
    assert d.text == byte_tok.decode(out) and d.text.endswith("\ufffd")


# ---------------------------------------------------------------- stop strings
def test_stop_string_cuts_before_the_stop(word_tok):
    d, deltas = run(word_tok, [BOS], [5, 6, 7, 8], stop=("t7",))
    assert d.stopped and d.text == "t5 t6 "
    assert "".join(deltas) == "t5 t6 "
    d.add(9)                                                   # ignored once stopped
    assert d.text == "t5 t6 " and d.delta(final=True) == ""


def test_earliest_of_several_stops_wins(word_tok):
    for stop in (("t7", "6 t"), ("6 t", "t7")):
        d, _ = run(word_tok, [BOS], [5, 6, 7, 8], stop=stop)
        assert d.stopped and d.text == "t5 t"                  # "6 t" starts at 4, "t7" at 6


def test_first_stop_to_appear_ends_the_text(word_tok):
    # "t6" completes one token before "t5 t6 t7" could: the text ends there
    d, _ = run(word_tok, [BOS], [5, 6, 7], stop=("t5 t6 t7", "t6"))
    assert d.stopped and d.text == "t5 "


def test_stop_string_spanning_two_tokens(word_tok):
    d, _ = run(word_tok, [BOS], [5, 6, 7], stop=("5 t6",))
    assert d.stopped and d.text == "t"


def test_stop_string_spanning_many_byte_tokens(byte_tok):
    out = byte_tok.encode("héllo wörld, ünïcode")
    stop = "wörld, ü"
    d, deltas = run(byte_tok, byte_tok.encode("x "), out, stop=(stop,))
    assert d.stopped and d.text == "héllo "
    assert "".join(deltas) == "héllo "


def test_stop_string_not_in_output(word_tok):
    d, deltas = run(word_tok, [BOS], [5, 6, 7], stop=("t9",))
    assert not d.stopped and d.text == "t5 t6 t7" and "".join(deltas) == d.text


def test_stop_string_in_the_prompt_is_ignored(word_tok):
    d, _ = run(word_tok, [5, 6], [7, 8], stop=("t6",))
    assert not d.stopped and d.text == " t7 t8"


def test_stop_string_in_flushed_tail(byte_tok):
    """A token that ends a word and starts a multi-byte character ('h' + first byte of 'é')."""
    tok_h_partial = byte_tok.encode("héllo")[0]
    assert byte_tok.decode([tok_h_partial]) == "h\ufffd"
    d = IncrementalDetokenizer(byte_tok, byte_tok.encode("x "), stop=("h",))
    d.add(tok_h_partial)
    assert d.text == "" and not d.stopped
    d.flush()                                                   # the request ended here (length)
    assert d.stopped and d.text == ""
    assert d.delta(final=True) == ""


# ---------------------------------------------------------------- streaming
def test_delta_holds_back_a_possible_stop_prefix(word_tok):
    d = IncrementalDetokenizer(word_tok, [BOS], stop=("t6 t9",))   # holdback 4 characters
    got = []
    for t in (5, 6, 7):
        d.add(t)
        got.append(d.delta(final=False))
    assert d.text == "t5 t6 t7"
    assert got == ["", "t", "5 t"]
    assert d.delta(final=True) == "6 t7"


def _could_start_stop(tail: str, stops: tuple[str, ...]) -> bool:
    return any(len(tail) < len(s) and s.startswith(tail) for s in stops)


@pytest.mark.parametrize("seed", range(4))
def test_streaming_never_emits_a_possible_stop_start(byte_tok, seed):
    rng = random.Random(seed)
    for _ in range(60):
        text = rng.choice(TRAIN)
        i = rng.randrange(len(text))
        j = min(len(text), i + rng.randint(1, 6))
        stops = (text[i:j],) + ((rng.choice(["o w", "ö", "日本", "STOP", "zz"]),) if rng.random() < 0.5 else ())
        out = byte_tok.encode(rng.choice(TRAIN))
        d = IncrementalDetokenizer(byte_tok, byte_tok.encode("x "), stops)
        streamed = ""
        ref_stop_at = None
        for k, t in enumerate(out, 1):
            d.add(t)
            streamed += d.delta(final=False)
            assert d.text.startswith(streamed)                 # nothing ever retracted
            if d.stopped:
                assert streamed == d.text                      # a stopped request streams all it has
                ref_stop_at = k
                break
            for p in range(len(streamed)):                     # nothing that may begin a stop
                assert not _could_start_stop(d.text[p:], stops), (d.text, streamed, stops)
            assert not any(s in d.text for s in stops)
        d.flush()
        streamed += d.delta(final=True)
        assert streamed == d.text
        # reference: the first complete prefix of the output that contains a stop, cut at the earliest
        full = None
        for k in range(1, len(out) + 1):
            t = byte_tok.decode(out[:k])
            if t.endswith("\ufffd"):
                continue
            hits = [t.find(s) for s in stops if s in t]
            if hits:
                full = t[:min(hits)]
                assert k == ref_stop_at
                break
        if full is None:
            full = byte_tok.decode(out)
            assert ref_stop_at is None
        assert d.text == full

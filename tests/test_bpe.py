import json
import random
import unicodedata

import numpy as np
import pytest

from tinyllm import bpe
from tinyllm.bpe import BYTE_ENCODER, OTHER, SPACE, bytes_to_unicode, char_class, pretokenize
from tinyllm.checkpoint import CheckpointError
from tinyllm.tokenizer import BPETokenizer

# ----------------------------------------------------------------------------------------------------
# a hand-checked vocabulary: id = byte value for the 256 single bytes, then 7 merges and the special token

HAND_MERGES = [("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o"), ("Ġ", "w"), ("o", "r"), ("Ġw", "or")]


def hand_vocab():
    vocab = {ch: b for b, ch in BYTE_ENCODER.items()}
    for i, (left, right) in enumerate(HAND_MERGES):
        vocab[left + right] = 256 + i       # he 256, ll 257, hell 258, hello 259, Ġw 260, or 261, Ġwor 262
    vocab["<|endoftext|>"] = 263
    return vocab


@pytest.fixture
def hand():
    return BPETokenizer(hand_vocab(), HAND_MERGES)


def write_files(folder, vocab, merges_text):
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) if isinstance(vocab, dict) else vocab,
                                       encoding="utf-8")
    (folder / "merges.txt").write_text(merges_text, encoding="utf-8")
    return folder


def test_bytes_to_unicode_is_gpt2s_table():
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256)) and len(set(table.values())) == 256
    assert table[ord("a")] == "a" and table[ord("!")] == "!" and table[0xE9] == "é"     # printable: itself
    assert table[0] == chr(256) and table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ" and table[0xAD] == "Ń"
    assert not any(ch.isspace() or char_class(ch) == SPACE for ch in table.values())   # merges.txt splits on " "


def test_hand_checked_ids(hand):
    assert hand.vocab_size == 264 and repr(hand) == "BPETokenizer(vocab_size=264, merges=7)"
    assert hand.encode("hello") == [259]
    assert hand.encode("hello world") == [259, 262, ord("l"), ord("d")]          # "hello", " world" -> Ġwor l d
    assert hand.encode("hellllo") == [258, 257, ord("o")]                       # he ll ll o -> hell ll o
    assert hand.encode("héllo") == [ord("h"), 0xC3, 0xA9, 257, ord("o")]        # é is 2 bytes: no "he" merge
    assert hand.encode("\n") == [10] and hand.encode("") == []
    assert hand.encode("a<|endoftext|>b") == [ord("a"), 263, ord("b")]
    assert hand.encode("a<|endoftext|>b", special=False) == list(b"a<|endoftext|>b")


def test_merge_steps_show_how_a_word_is_built(hand):
    assert hand.merge_steps("hello") == [("h", "e", "l", "l", "o"), ("he", "l", "l", "o"), ("he", "ll", "o"),
                                         ("hell", "o"), ("hello",)]
    assert hand.merge_steps(" world") == [("Ġ", "w", "o", "r", "l", "d"), ("Ġw", "o", "r", "l", "d"),
                                          ("Ġw", "or", "l", "d"), ("Ġwor", "l", "d")]
    assert hand.merge_steps("hellllo") == [("h", "e", "l", "l", "l", "l", "o"), ("he", "l", "l", "l", "l", "o"),
                                           ("he", "ll", "ll", "o"), ("hell", "ll", "o")]   # each pair everywhere
    assert hand.merge_steps("") == [()]


def test_merges_follow_gpt2s_encoder_py_on_out_of_order_lists():
    # "ab a" ranks before "a b", which makes "ab": encoder.py merges every "a b" first and is then stuck;
    # Hugging Face's Rust BPE merges the first "a b", then "ab a" at once, giving ("aba", "b")
    vocab = {**{ch: b for b, ch in BYTE_ENCODER.items()}, "ab": 256, "aba": 257}
    assert BPETokenizer(vocab, [("ab", "a"), ("a", "b")]).merge_steps("abab") == [tuple("abab"), ("ab", "ab")]


def test_decode_partial_characters(hand):
    assert hand.decode_bytes([0xC3, 0xA9]) == "é".encode() and hand.decode([0xC3, 0xA9]) == "é"
    assert hand.decode([0xC3]) == "\ufffd" and hand.decode([ord("a"), 0xC3]) == "a\ufffd"   # GPT-2: "replace"
    assert hand.decode(np.array([259, 262], dtype=np.int32)) == "hello wor" and hand.decode([]) == ""


def test_cache_gives_the_same_ids_and_stays_bounded(hand, monkeypatch):
    monkeypatch.setattr(bpe, "CACHE_SIZE", 2)
    text = "hello world hello a b c hello"
    first = hand.encode(text)
    assert hand.encode(text) == first and len(hand._cache) <= 2


def test_bad_inputs_give_clear_errors(hand):
    with pytest.raises(TypeError, match="decode bytes first"):
        hand.encode(b"hello")
    with pytest.raises(ValueError, match="lone surrogate '\\\\ud800' at position 2"):
        hand.encode("ab\ud800")
    with pytest.raises(ValueError, match="id 264 at position 1"):
        hand.decode([1, 264])
    with pytest.raises(ValueError, match="shape"):
        hand.decode([[1, 2]])
    with pytest.raises(ValueError, match="integers"):
        hand.decode([1.0])


# ----------------------------------------------------------------------------------------------------
# the split pattern

TRICKY = [
    ("", []),
    ("I'm here", ["I", "'m", " here"]),
    ("don't we'll they've", ["don", "'t", " we", "'ll", " they", "'ve"]),
    ("THEY'RE she'S", ["THEY", "'", "RE", " she", "'", "S"]),        # contractions are lower case only
    ("it’s", ["it", "’", "s"]),                                           # U+2019 is not the ASCII apostrophe
    ("'s's''s", ["'s", "'s", "''", "s"]),                                 # a punctuation run takes the apostrophes
    (" 's", [" '", "s"]),
    ("x² ½ 10abc", ["x", "²", " ½", " 10", "abc"]),                       # ² and ½ are numbers, not letters
    ("a  b", ["a", " ", " b"]),                                           # the last space leads the word
    ("a   b", ["a", "  ", " b"]),
    ("a\t\tb", ["a", "\t", "\t", "b"]),                                   # ...but only U+0020 leads a word
    ("a \tb", ["a", " ", "\t", "b"]),
    ("a\t b", ["a", "\t", " b"]),
    ("a\n\nb", ["a", "\n", "\n", "b"]),
    ("a\r\nb\r\n", ["a", "\r", "\n", "b", "\r\n"]),                       # at the end the whole run is one
    ("end  ", ["end", "  "]),
    ("  lead", [" ", " lead"]),
    (" ", [" "]),
    ("\xa0b \xa0c", ["\xa0", "b", " ", "\xa0", "c"]),                        # NBSP is \s but never leads a word
    ("a\x85b", ["a", "\x85", "b"]),                                       # U+0085 is \s
    ("a\x1cb \x1d\x1e\x1f", ["a", "\x1c", "b", " \x1d\x1e\x1f"]),         # U+001C..1F are not (unlike isspace)
    ("x\u2028\u2029y", ["x", "\u2028", "\u2029", "y"]),
    ("\u200bx\ufeff", ["\u200b", "x", "\ufeff"]),                         # zero-width space is not \s
    ("Ünïcödé ΑΒΓ Привет", ["Ünïcödé", " ΑΒΓ", " Привет"]),
    ("e\u0301t\u00e9", ["e", "\u0301", "t\u00e9"]),                       # a combining accent is not a letter
    ("日本語のテキスト。한국어", ["日本語のテキスト", "。", "한국어"]),
    ("😀😀 ok!! ...", ["😀😀", " ok", "!!", " ..."]),
]


@pytest.mark.parametrize("text, pieces", TRICKY)
def test_pretokenize_tricky_strings(text, pieces):
    assert pretokenize(text) == pieces


def test_whitespace_is_the_rust_regexs_not_isspace():
    assert [char_class(ch) for ch in "\t\n\x0b\x0c\r\x85\xa0\u1680\u2000\u2028\u2029\u3000"] == [SPACE] * 12
    assert all(ch.isspace() and char_class(ch) == OTHER for ch in "\x1c\x1d\x1e\x1f")
    assert char_class("²") == char_class("½") == char_class("Ⅷ") == "N" and char_class("ǅ") == "L"


# ----------------------------------------------------------------------------------------------------
# round trip on random Unicode

WHITESPACE = ("\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
              "\u2028\u2029\u202f\u205f\u3000\x1c\x1d\x1e\x1f\u200b\u180e\ufeff")
SNIPPETS = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", " ", "  ", "\n", "<|endoftext|>", "hello", " the"]
RANGES = [(0x20, 0x7F), (0x80, 0x250), (0x300, 0x370), (0x370, 0x530), (0x590, 0x700), (0x900, 0xE80),
          (0x1D00, 0x2C00), (0x3000, 0x3100), (0x4E00, 0xA000), (0xAC00, 0xD7A4), (0xE000, 0xF900),
          (0xFB00, 0x10000), (0x10000, 0x20000), (0x20000, 0x30000), (0xE0000, 0xE0200), (0xF0000, 0x110000)]


def random_text(rng, assigned_only=False):
    """A random str over many planes (never a surrogate): code points, whitespace of every kind, snippets."""
    out = []
    while len(out) < rng.randint(0, 40):
        r = rng.random()
        if r < 0.2:
            out.append(rng.choice(WHITESPACE))
        elif r < 0.35:
            out.append(rng.choice(SNIPPETS))
        else:
            lo, hi = rng.choice(RANGES)
            ch = chr(rng.randrange(lo, hi))
            if not (assigned_only and unicodedata.category(ch) == "Cn"):
                out.append(ch)
    return "".join(out)


def test_round_trip_random_unicode(hand):
    rng = random.Random(0)
    for _ in range(400):
        text = random_text(rng)
        assert "".join(pretokenize(text)) == text
        assert hand.decode(hand.encode(text)) == text
        assert hand.decode(hand.encode(text, special=False)) == text


# ----------------------------------------------------------------------------------------------------
# parity with Hugging Face: a byte-level BPE trained by `tokenizers`, loaded by them and by us
#
# Only code points that this Python's unicodedata knows are drawn: the Rust regex knows a newer Unicode,
# where some characters still unassigned for Python (our OTHER) are already letters or numbers.

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers
    rng = random.Random(1)
    words = ["hello", "world", "the", "The", "don't", "it's", "we're", "I'll", "naïve", "café", "Straße", "Привет",
             "日本語", "한국어", "😀", "123", "4567", "x²", "½", "e\u0301", "...", "!!", "\t", "\n", "  "]
    corpus = ["".join(rng.choice([" ", " ", "", "\n"]) + rng.choice(words) for _ in range(30)) for _ in range(300)]
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)    # GPT-2's settings
    trainer = trainers.BpeTrainer(vocab_size=500, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"], show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    folder = tmp_path_factory.mktemp("bpe")
    tok.model.save(str(folder))
    hf = tokenizers.Tokenizer(models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt")))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    return folder, BPETokenizer.from_pretrained(folder), hf, corpus


def parity_texts():
    rng = random.Random(2)
    return [text for text, _ in TRICKY] + [random_text(rng, assigned_only=True) for _ in range(400)]


def test_pretokenize_matches_tokenizers(trained):
    from tokenizers import pre_tokenizers
    split = pre_tokenizers.ByteLevel(add_prefix_space=False).pre_tokenize_str
    for text in parity_texts():
        assert pretokenize(text) == [text[a:b] for _, (a, b) in split(text)], text


def test_ids_match_tokenizers(trained):
    folder, ours, hf, corpus = trained
    assert ours.vocab_size == hf.get_vocab_size() == 500
    assert ours.vocab == hf.get_vocab()
    assert sum(len(ours.encode(t)) for t in corpus) < 0.5 * sum(len(t.encode()) for t in corpus)  # merges work
    for text in corpus[:20] + parity_texts():
        assert ours.encode(text, special=False) == hf.encode(text).ids, text     # bare BPE: no special tokens


def test_decode_matches_tokenizers(trained):
    folder, ours, hf, corpus = trained
    rng = random.Random(3)
    for _ in range(2000):                     # random ids: often not valid UTF-8
        ids = [rng.randrange(ours.vocab_size) for _ in range(rng.randint(0, 8))]
        assert ours.decode(ids) == hf.decode(ids), ids


def test_ids_match_transformers_gpt2_tokenizer(trained):
    transformers = pytest.importorskip("transformers")
    folder, ours, hf, corpus = trained
    gpt2 = transformers.GPT2Tokenizer.from_pretrained(str(folder))
    specials = ["a<|endoftext|>b", " <|endoftext|> x", "<|endoftext|><|endoftext|>", "<|endoftext|"]
    for text in parity_texts() + specials:
        assert ours.encode(text) == gpt2.encode(text, add_special_tokens=False), text
        assert ours.decode(ours.encode(text)) == gpt2.decode(gpt2.encode(text, add_special_tokens=False)) == text


# ----------------------------------------------------------------------------------------------------
# the files

def test_from_pretrained_reads_gpt2s_files(tmp_path):
    merges = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in HAND_MERGES)
    tok = BPETokenizer.from_pretrained(write_files(tmp_path, hand_vocab(), merges))
    assert tok.ranks == BPETokenizer(hand_vocab(), HAND_MERGES).ranks and tok.vocab == hand_vocab()
    # no #version line, Windows line ends, no final newline: the same merges
    write_files(tmp_path, hand_vocab(), "\r\n".join(f"{a} {b}" for a, b in HAND_MERGES))
    assert BPETokenizer.from_pretrained(tmp_path).ranks == tok.ranks
    # only a first line "#version..." is a header: "# #" is the merge of two "#"
    write_files(tmp_path, {**hand_vocab(), "##": 264}, "#version: 0.2\n# #\n")
    assert BPETokenizer.from_pretrained(tmp_path).encode("a###") == [ord("a"), 264, ord("#")]


def vocab_with(**changes):
    """hand_vocab() as JSON text with some tokens changed (None removes one)."""
    vocab = hand_vocab()
    for token, i in changes.items():
        if i is None:
            del vocab[token]
        else:
            vocab[token] = i
    return json.dumps(vocab, ensure_ascii=False)


GOOD_MERGES = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in HAND_MERGES)


@pytest.mark.parametrize("vocab, merges, match", [
    ('{"a": 0,', GOOD_MERGES, "vocab.json' is not valid JSON"),
    ("[1, 2]", GOOD_MERGES, "non-empty dict"),
    (vocab_with(he="256"), GOOD_MERGES, "token 'he' has id '256'; ids must be integers"),
    (vocab_with(he=256.0), GOOD_MERGES, "ids must be integers"),
    (vocab_with(he=True), GOOD_MERGES, "ids must be integers"),
    (vocab_with(he=0), GOOD_MERGES, "id 0 is given to two tokens"),
    (vocab_with(he=None), GOOD_MERGES, "ids must be 0..262.*id 256 is missing"),
    (vocab_with(hello=None, **{"h€llo": 259}), GOOD_MERGES, "holds '€'.*not one of the 256 byte characters"),
    (vocab_with(Ġ=None, **{"x y": 32}), GOOD_MERGES, "holds ' '"),
    (vocab_with(Ġ=None, **{"<pad>": 32}), GOOD_MERGES, "lacks the token 'Ġ' for byte 0x20"),
    (vocab_with().replace('"!": 33', '"!": 33, "!": 33'), GOOD_MERGES, "token '!' appears twice"),
    (vocab_with(), GOOD_MERGES + "a b c\n", "merges.txt' line 9 is 'a b c', not a merge"),
    (vocab_with(), GOOD_MERGES + "ab\n", "line 9 is 'ab'"),
    (vocab_with(), GOOD_MERGES + "a  b\n", "line 9 is 'a  b'"),
    (vocab_with(), "#version: 0.2\nh e\n\nl l\n", "line 3 is ''"),
    (vocab_with(), GOOD_MERGES + "x hello\n", "merge 7 \\('x', 'hello'\\): its result 'xhello' is not in the"),
    (vocab_with(), GOOD_MERGES + "Ġwor ld\n", "its right part 'ld' is not in the vocabulary"),
    (vocab_with(), GOOD_MERGES + "h e\n", "merge 7 \\('h', 'e'\\) repeats merge 0"),
])
def test_malformed_files_give_clear_errors(tmp_path, vocab, merges, match):
    write_files(tmp_path, vocab, merges)
    with pytest.raises(CheckpointError, match=match) as info:
        BPETokenizer.from_pretrained(tmp_path)
    assert isinstance(info.value, ValueError) and str(tmp_path) in str(info.value)


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(CheckpointError, match="no vocab.json in .*holds vocab.json and merges.txt"):
        BPETokenizer.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "vocab.json").write_text(vocab_with(), encoding="utf-8")
    with pytest.raises(CheckpointError, match="no merges.txt in"):
        BPETokenizer.from_pretrained(tmp_path)
    (tmp_path / "merges.txt").write_bytes(b"#version: 0.2\n\xc4 t\n")
    with pytest.raises(CheckpointError, match="merges.txt' is not UTF-8 text"):
        BPETokenizer.from_pretrained(tmp_path)


def test_in_memory_merges_are_checked():
    with pytest.raises(CheckpointError, match="merge 0 is 'h e'; a merge is a pair of two tokens"):
        BPETokenizer(hand_vocab(), ["h e"])
    with pytest.raises(CheckpointError, match="its left part '€' is not in the vocabulary"):
        BPETokenizer(hand_vocab(), [("€", "he")])

import numpy as np
import pytest

from tinyllm.tokenizer import VOCAB, CharTokenizer, TokenizerError, default_tokenizer


def test_vocab_fits_the_model():
    assert len(VOCAB) <= 64
    assert len(set(VOCAB)) == len(VOCAB)
    assert default_tokenizer().vocab_size == len(VOCAB)
    assert VOCAB == VOCAB.lower()


@pytest.mark.parametrize("text", ["", "a", "mia lives in oslo.\n", "q: how old is leo?\na: 42\n",
                                  " name=kim|city=rome|age=31\n", "3 plus 4 is 7. it's 'fine'; ok! (yes) -> <x>",
                                  VOCAB])
def test_round_trip(text):
    tok = default_tokenizer()
    ids = tok.encode(text)
    assert ids.dtype == np.int64 and ids.shape == (len(text),)
    assert tok.decode(ids) == text
    assert tok.decode(ids.tolist()) == text          # lists work too


def test_ids_follow_the_alphabet_order():
    tok = CharTokenizer("ba\n")
    assert tok.encode("ab\n").tolist() == [1, 0, 2]
    assert tok.chars == "ba\n" and tok.vocab_size == 3


def test_duplicate_characters_are_rejected():
    with pytest.raises(ValueError, match="twice"):
        CharTokenizer("abca")


@pytest.mark.parametrize("text, char, pos", [("hello wörld", "ö", 7), ("tab\there", "\t", 3), ("Mia", "M", 0)])
def test_unknown_character_error_names_char_and_position(text, char, pos):
    tok = default_tokenizer()
    with pytest.raises(TokenizerError) as info:
        tok.encode(text)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.char == char and err.position == pos
    assert repr(char) in str(err) and f"position {pos}" in str(err)
    assert "remove or replace" in str(err)


def test_upper_case_gets_a_hint():
    with pytest.raises(TokenizerError, match="lower-case"):
        default_tokenizer().encode("Oslo")


@pytest.mark.parametrize("ids, bad, pos", [([1, 2, 64], 64, 2), ([-1], -1, 0), (np.array([5, 99, 3]), 99, 1)])
def test_decode_rejects_ids_outside_the_vocab(ids, bad, pos):
    with pytest.raises(ValueError, match=f"id {bad} at position {pos}"):
        default_tokenizer().decode(ids)


def test_decode_wants_one_dimension():
    with pytest.raises(ValueError, match="1-D"):
        default_tokenizer().decode(np.zeros((2, 3), dtype=np.int64))
    assert default_tokenizer().decode([]) == ""

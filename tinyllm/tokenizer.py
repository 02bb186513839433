"""A character-level tokenizer: one token id per character.

GPT-2 uses byte-pair encoding with 50,257 tokens; tinyllm uses single characters so that the vocabulary is
tiny (64 ids), every id can be printed and read, and the model stays small. The corpus and the tasks are
written in lower case so that 64 characters are enough.
"""
import string

import numpy as np

from .checks import check_token_ids

# The default alphabet, in id order: newline (id 0), space, the punctuation our text may use, digits,
# lower-case letters. 2 + 26 + 10 + 26 = 64 characters, the vocab_size of the bench GPTConfig.
VOCAB = "\n" + " " + "!\"#$%&'()*+,-./:;<=>?@[]_|" + string.digits + string.ascii_lowercase


class TokenizerError(ValueError):
    """Raised by encode() for a character outside the alphabet; .char and .position say which one."""

    def __init__(self, message, char, position):
        super().__init__(message)
        self.char = char
        self.position = position


class CharTokenizer:
    """Maps each character of a fixed alphabet to its index in that alphabet.

    Inputs:
    - chars: str, the alphabet in id order (chars[i] has id i); no character may appear twice.
    """

    def __init__(self, chars):
        if not isinstance(chars, str) or not chars:
            raise ValueError(f"chars must be a non-empty string (the alphabet), got {chars!r}")
        seen = set()
        for i, ch in enumerate(chars):
            if ch in seen:
                raise ValueError(f"character {ch!r} appears twice in the alphabet (again at index {i}); "
                                 f"each character needs exactly one id")
            seen.add(ch)
        self.chars = chars
        self.stoi = {ch: i for i, ch in enumerate(chars)}   # string -> id
        self.itos = list(chars)                              # id -> string

    @property
    def vocab_size(self):
        return len(self.chars)

    def encode(self, text):
        """Turn text into token ids.

        Inputs:
        - text: str; "" gives an empty array (a model cannot run on it, but concatenations can).

        Returns:
        - ids: (len(text),) int64 array.

        Raises TokenizerError (a ValueError) naming the first character that is not in the alphabet.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}"
                            + ("; decode bytes first: data.decode('utf-8')" if isinstance(text, bytes) else ""))
        ids = np.fromiter((self.stoi.get(ch, -1) for ch in text), dtype=np.int64, count=len(text))
        unknown = np.flatnonzero(ids < 0)
        if unknown.size:
            pos = int(unknown[0])
            ch = text[pos]
            hint = f" (tinyllm's text is lower-case: use {ch.lower()!r})" if ch.lower() in self.stoi else ""
            context = text[max(0, pos - 20): pos + 20]
            raise TokenizerError(
                f"unknown character {ch!r} at position {pos} in {context!r}{hint}; tinyllm's tokenizer knows "
                f"only these {self.vocab_size} characters: {self.chars!r}; remove or replace it", ch, pos)
        return ids

    def decode(self, ids):
        """Turn token ids back into text.

        Inputs:
        - ids: 1-D list or array of ints in [0, vocab_size).

        Returns:
        - text: str with one character per id.
        """
        ids = check_token_ids(ids, self.vocab_size)
        return "".join(self.itos[i] for i in ids.tolist())

    def __repr__(self):
        return f"CharTokenizer(vocab_size={self.vocab_size})"


def default_tokenizer():
    """The tokenizer for everything tinyllm generates: CharTokenizer(VOCAB)."""
    return CharTokenizer(VOCAB)


from .bpe import BPETokenizer  # noqa: E402,F401  (tinyllm.tokenizer.BPETokenizer)

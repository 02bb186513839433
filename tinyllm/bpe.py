"""GPT-2's tokenizer from scratch: byte-level byte-pair encoding (BPE), text -> bytes -> merged pairs -> ids.

Bytes. Text is encoded as UTF-8, so every string is a sequence of the 256 possible byte values and no
character is ever unknown. Each byte is written as one printable stand-in character (bytes_to_unicode:
"a" stays "a", the space becomes "Ġ", the newline "Ċ") so that vocab.json and merges.txt are plain text
files whose tokens hold no whitespace.

Pieces. A regular expression first splits the text into pieces: a word with its leading space, a run of
digits, a run of punctuation, whitespace, the contractions 's 't 're 've 'm 'll 'd (pretokenize). Merges
never cross a piece boundary, so " dog" is the same token in " dog.", " dog!" and " dog?".

Merges. merges.txt lists pairs of tokens in the order training learned them (the most frequent first,
rank 0). A piece starts as its single bytes; then, again and again, the adjacent pair with the lowest rank
is merged wherever it occurs, until no adjacent pair is in the list (merge_steps shows every step). The
tokens that remain are looked up in vocab.json. Words repeat, so each piece's ids are cached.

Decoding joins the tokens' bytes and decodes them as UTF-8. A model may sample ids that stop in the middle
of a character, so bytes that are not valid UTF-8 become U+FFFD, errors="replace" as GPT-2 does
(decode_bytes gives the exact bytes).
"""
import json
import os
import unicodedata

from .checkpoint import CheckpointError
from .checks import check_token_ids

SPECIAL = "<|endoftext|>"   # GPT-2's one special token (id 50256), between documents
CACHE_SIZE = 100_000        # pieces remembered by encode; the cache is emptied when full


def bytes_to_unicode():
    """GPT-2's table byte -> stand-in character: printable bytes map to themselves, the other 68
    (control characters, space, the soft hyphen...) to code points 256, 257, ... in byte order.

    Returns: dict {byte value (0..255): one-character str}.
    """
    keep = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    others = [b for b in range(256) if b not in keep]     # 0..32, 127..160, 173: unprintable or whitespace
    return {b: chr(b) if b in keep else chr(256 + others.index(b)) for b in range(256)}


BYTE_ENCODER = bytes_to_unicode()                          # byte -> character
BYTE_DECODER = {ch: b for b, ch in BYTE_ENCODER.items()}   # character -> byte

# ----------------------------------------------------------------------------------------------------
# the pre-tokenizer: GPT-2's split pattern, without the `regex` package
#
#   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
#
# Python's `re` has no \p{L} (letter) or \p{N} (number), so pretokenize scans left to right instead.
# Every character is in exactly one of four classes, so the pattern's pieces cover the whole text.

LETTER, NUMBER, SPACE, OTHER = "L", "N", "S", "P"


def char_class(ch):
    """The class of one character in GPT-2's pattern: LETTER (\\p{L}), NUMBER (\\p{N}), SPACE (\\s), OTHER.

    \\s is the Rust regex's: \\t..\\r, U+0085 and the separators Zs Zl Zp. That is not str.isspace, which
    also takes U+001C..U+001F. Classes come from Python's unicodedata, so a character assigned in a later
    Unicode version than Python knows (unicodedata.unidata_version) is OTHER until Python learns it.
    """
    cat = unicodedata.category(ch)
    if cat[0] in "LN":                                      # Lu Ll Lt Lm Lo, Nd Nl No: ² and ½ are numbers
        return cat[0]
    if "\t" <= ch <= "\r" or ch == "\x85" or cat in ("Zs", "Zl", "Zp"):
        return SPACE
    return OTHER


def pretokenize(text):
    """Split text into pieces exactly as GPT-2's pattern (above) does; "".join(pieces) == text.

    Inputs:
    - text: str.

    Returns:
    - pieces: list of str, e.g. "I'm  here!\\n" -> ["I", "'m", " ", " here", "!", "\\n"].
    """
    cls = [char_class(ch) for ch in text]
    pieces, i, n = [], 0, len(text)
    while i < n:
        if text.startswith(("'s", "'t", "'m", "'d"), i):   # contractions: lower case, ASCII apostrophe only
            j = i + 2
        elif text.startswith(("'re", "'ve", "'ll"), i):
            j = i + 3
        else:
            # ` ?\p{L}+`, ` ?\p{N}+`, ` ?[^\s\p{L}\p{N}]+`: one U+0020 space may lead a run of one class
            k = i + 1 if text[i] == " " and i + 1 < n and cls[i + 1] != SPACE else i
            j = k + 1
            while j < n and cls[j] == cls[k]:
                j += 1
            if cls[k] == SPACE and j < n and j - i > 1:
                j -= 1      # `\s+(?!\S)`: a space run before a non-space leaves its last character behind,
                            # which then leads the next piece if it is " ", else is a piece of its own
        pieces.append(text[i:j])
        i = j
    return pieces


# ----------------------------------------------------------------------------------------------------
# the tokenizer

class BPETokenizer:
    """GPT-2's byte-level BPE tokenizer.

    Inputs:
    - vocab: dict {token: id}, tokens written in bytes_to_unicode's characters, ids 0..len(vocab)-1;
      it must hold all 256 single-byte tokens.
    - merges: list of (left, right) token pairs, rank order (merges[0] is applied first); left, right
      and left + right must all be in vocab.

    Raises CheckpointError (a ValueError) saying what is wrong with vocab or merges.

    "<|endoftext|>" in text, when it is in the vocabulary, becomes its one id, as Hugging Face's
    GPT2Tokenizer does (it registers it as a special token); encode(text, special=False) treats it as
    ordinary text, as a bare `tokenizers` BPE built from the two files does. (tiktoken raises an error.)
    """

    def __init__(self, vocab, merges):
        if not isinstance(vocab, dict) or not vocab:
            raise CheckpointError(f"vocab must be a non-empty dict {{token: id}}, got {type(vocab).__name__}")
        owner = {}
        for token, i in vocab.items():
            if not isinstance(token, str) or not token:
                raise CheckpointError(f"vocab key {token!r} is not a token: keys must be non-empty strings")
            if type(i) is not int:
                raise CheckpointError(f"token {token!r} has id {i!r}; ids must be integers")
            if i in owner:
                raise CheckpointError(f"id {i} is given to two tokens, {owner[i]!r} and {token!r}; "
                                      f"each id must name one token")
            owner[i] = token
            bad = next((ch for ch in token if ch not in BYTE_DECODER), None)
            if bad is not None:
                raise CheckpointError(f"token {token!r} holds {bad!r} (U+{ord(bad):04X}), which is not one of "
                                      f"the 256 byte characters of bytes_to_unicode(): is this a byte-level "
                                      f"(GPT-2 style) vocabulary?")
        missing = [i for i in range(len(vocab)) if i not in owner]
        if missing:
            raise CheckpointError(f"ids must be 0..{len(vocab) - 1}, one per token with none skipped (they index "
                                  f"the model's embedding rows), but id {missing[0]} is missing")
        for b, ch in BYTE_ENCODER.items():
            if ch not in vocab:
                raise CheckpointError(f"the vocabulary lacks the token {ch!r} for byte {b:#04x}; byte-level "
                                      f"BPE needs all 256 single-byte tokens so that any text can be encoded")
        self.ranks = {}                                     # (left, right) -> rank
        for r, pair in enumerate(merges):
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2
                    and all(isinstance(t, str) and t for t in pair)):
                raise CheckpointError(f"merge {r} is {pair!r}; a merge is a pair of two tokens, like ('Ġ', 't')")
            left, right = pair
            for what, token in (("its left part", left), ("its right part", right), ("its result", left + right)):
                if token not in vocab:
                    raise CheckpointError(f"merge {r} ({left!r}, {right!r}): {what} {token!r} is not in the "
                                          f"vocabulary; vocab and merges must come from the same tokenizer")
            if (left, right) in self.ranks:
                raise CheckpointError(f"merge {r} ({left!r}, {right!r}) repeats merge {self.ranks[left, right]}")
            self.ranks[left, right] = r
        self.vocab = dict(vocab)                            # token -> id
        self.tokens = [owner[i] for i in range(len(vocab))]  # id -> token
        self._cache = {}                                    # piece -> tuple of ids

    @classmethod
    def from_pretrained(cls, folder):
        """Load vocab.json and merges.txt (GPT-2's files, e.g. those of huggingface.co/gpt2) from folder.

        merges.txt holds one merge a line, "left right", after an optional "#version" first line.
        Raises CheckpointError naming the file and what is wrong with it.
        """
        folder = os.fspath(folder)
        paths = {name: os.path.join(folder, name) for name in ("vocab.json", "merges.txt")}
        texts = {}
        for name, path in paths.items():
            if not os.path.isfile(path):
                raise CheckpointError(f"no {name} in {folder!r}: a GPT-2 tokenizer folder holds vocab.json and "
                                      f"merges.txt (as on huggingface.co/gpt2)")
            try:
                with open(path, "rb") as f:
                    texts[name] = f.read().decode("utf-8")
            except OSError as e:
                raise CheckpointError(f"cannot read {path!r}: {e.strerror}") from None
            except UnicodeDecodeError as e:
                raise CheckpointError(f"{path!r} is not UTF-8 text ({e})") from None

        def no_repeats(pairs):                              # json.loads would silently keep the last one
            vocab = {}
            for token, i in pairs:
                if token in vocab:
                    raise CheckpointError(f"{paths['vocab.json']!r}: token {token!r} appears twice; each "
                                          f"token needs exactly one id")
                vocab[token] = i
            return vocab

        try:
            vocab = json.loads(texts["vocab.json"], object_pairs_hook=no_repeats)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{paths['vocab.json']!r} is not valid JSON ({e})") from None
        lines = texts["merges.txt"].split("\n")
        while lines and lines[-1] in ("", "\r"):            # a final newline ends the last merge
            lines.pop()
        merges = []
        for number, line in enumerate(lines, 1):
            line = line.removesuffix("\r")
            if number == 1 and line.startswith("#version"):
                continue
            pair = line.split(" ")
            if len(pair) != 2 or not all(pair):
                raise CheckpointError(f"{paths['merges.txt']!r} line {number} is {line!r}, not a merge: each "
                                      f"line must be two tokens separated by one space, like 'Ġ t'")
            merges.append(tuple(pair))
        try:
            return cls(vocab, merges)
        except CheckpointError as e:
            raise CheckpointError(f"{folder!r}: {e}") from None

    @property
    def vocab_size(self):
        return len(self.tokens)

    def merge_steps(self, piece):
        """How BPE builds a piece: its single bytes, then the tokens after each merge.

        Inputs:
        - piece: str, treated as one piece (pretokenize(text) splits a text into pieces).

        Returns:
        - steps: list of tuples of tokens, e.g. for "hello" with merges h+e, l+l, he+ll, hell+o:
          [('h','e','l','l','o'), ('he','l','l','o'), ('he','ll','o'), ('hell','o'), ('hello',)].

        This is GPT-2's encoder.py. Hugging Face's Rust BPE merges one occurrence at a time, which can differ
        on a hand-made list where a merge uses a token only a later merge makes (tests check a trained list).
        """
        word = tuple(BYTE_ENCODER[b] for b in piece.encode("utf-8"))
        steps = [word]
        while len(word) > 1:
            pair = min(zip(word, word[1:]), key=lambda p: self.ranks.get(p, float("inf")))
            if pair not in self.ranks:
                break                                       # no adjacent pair was ever merged in training
            merged, i = [], 0
            while i < len(word):                            # merge every occurrence, left to right
                if word[i:i + 2] == pair:
                    merged.append(pair[0] + pair[1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
            steps.append(word)
        return steps

    def encode(self, text, special=True):
        """Turn text into token ids.

        Inputs:
        - text: str, any; "" gives [].
        - special: if True, each "<|endoftext|>" in text becomes its own id (when the vocabulary has it).

        Returns:
        - ids: list of int.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}"
                            + ("; decode bytes first: data.decode('utf-8')" if isinstance(text, bytes) else ""))
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"text holds a lone surrogate {text[e.start]!r} at position {e.start}: it is half of "
                             f"a UTF-16 pair, not a character, and has no UTF-8 bytes; repair the text first, "
                             f"e.g. text.encode('utf-8', 'replace').decode()") from None
        segments = text.split(SPECIAL) if special and SPECIAL in self.vocab else [text]
        ids = []
        for k, segment in enumerate(segments):
            if k:
                ids.append(self.vocab[SPECIAL])
            for piece in pretokenize(segment):
                piece_ids = self._cache.get(piece)
                if piece_ids is None:
                    piece_ids = tuple(self.vocab[token] for token in self.merge_steps(piece)[-1])
                    if len(self._cache) >= CACHE_SIZE:
                        self._cache.clear()
                    self._cache[piece] = piece_ids
                ids.extend(piece_ids)
        return ids

    def decode_bytes(self, ids):
        """The exact bytes that ids stand for (1-D list or array of ints in [0, vocab_size))."""
        ids = check_token_ids(ids, self.vocab_size)
        return bytes(BYTE_DECODER[ch] for i in ids.tolist() for ch in self.tokens[i])

    def decode(self, ids):
        """Turn token ids back into text; decode(encode(text)) == text for every text encode accepts.

        Bytes that are not valid UTF-8 (ids that end mid-character) become U+FFFD, as in GPT-2.
        """
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def __repr__(self):
        return f"BPETokenizer(vocab_size={self.vocab_size}, merges={len(self.ranks)})"

"""Tokenizing (special-token parsing chosen per piece of text) and incremental detokenizing.

This is where text and token ids cross into llama.cpp, so this is where they are made safe: text with
lone surrogates (which JSON's \\ud800 escapes and Python's surrogateescape can produce, but UTF-8 cannot
encode) has them replaced by U+FFFD, and an id outside the vocabulary is refused before llama.cpp
sees it (it indexes its token table unchecked and aborts the whole process).
"""

from __future__ import annotations

import codecs
import ctypes
import threading

import llama_cpp

from ggufchat.errors import InvalidParameter

_SLICE = 1 << 16
_SPELL_MAX = 32  # the longest piece spell() uses


def _scrub_surrogates(text: str) -> str:
    """`text` with every lone surrogate replaced by U+FFFD (a valid pair becomes its character)."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def valid_unicode(text: str) -> str:
    """`text` itself when UTF-8 can encode it, else a copy with its lone surrogates as U+FFFD."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return _scrub_surrogates(text)
    return text


def encode_text(text: str) -> bytes:
    """UTF-8 bytes of any str, lone surrogates as U+FFFD."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return _scrub_surrogates(text).encode("utf-8")


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens `a` and `b` share. Called every step on whole contexts (the draft model's
    catch-up) and on every free slot per admission: the long shared head is compared with one slice
    comparison (a C loop), only the last tokens one by one."""
    n = min(len(a), len(b))
    lo = max(0, n - 64)
    if a[:lo] != b[:lo]:  # they part early: binary search for the longest equal head below lo
        hi = lo - 1
        lo = 0
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if a[:mid] == b[:mid]:
                lo = mid
            else:
                hi = mid - 1
        return lo
    while lo < n and a[lo] == b[lo]:
        lo += 1
    return lo


class Tokenizer:
    """Thin, thread-safe wrapper over a llama.cpp vocab (tokenizing only reads the vocab)."""

    def __init__(self, vocab) -> None:
        self.vocab = vocab
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(vocab))
        self.bos = llama_cpp.llama_vocab_bos(vocab)
        self.eos = llama_cpp.llama_vocab_eos(vocab)
        self._pieces: dict[int, bytes] = {}
        self._eog: list[int] | None = None
        self._special: list[bytes] | None = None
        self._spelling: dict[bytes, int] | None = None
        self._lock = threading.Lock()

    def tokenize(self, text: str, *, add_special: bool = False, parse_special: bool = False) -> list[int]:
        data = encode_text(text)
        cap = len(data) + 8
        buf = (llama_cpp.llama_token * cap)()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:
            cap = -n
            buf = (llama_cpp.llama_token * cap)()
            n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        if n <= _SLICE:
            return buf[:n]
        # Copied out in slices: one slice of millions of ids holds the GIL for tens of milliseconds in a
        # single C call, and an event loop in another thread waits that long (docs/benchmarks.md).
        tokens: list[int] = []
        for i in range(0, n, _SLICE):
            tokens += buf[i:min(n, i + _SLICE)]
        return tokens

    def check_ids(self, tokens: list[int], param: str = "prompt") -> None:
        """Refuse ids outside the vocabulary; every id from a client passes here before llama.cpp."""
        if tokens and (min(tokens) < 0 or max(tokens) >= self.n_vocab):
            bad = next(t for t in tokens if not 0 <= t < self.n_vocab)
            raise InvalidParameter(f"token id {bad} is outside the vocabulary (0..{self.n_vocab - 1})", param=param)

    def piece(self, token: int) -> bytes:
        """The bytes a token stands for; control tokens (end-of-turn, ...) give b''."""
        cached = self._pieces.get(token)
        if cached is None:
            self.check_ids([token], "tokens")
            buf = ctypes.create_string_buffer(64)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
            cached = buf.raw[:n]
            self._pieces[token] = cached
        return cached

    def special_text(self, token: int) -> str:
        """A token's text with special tokens rendered (e.g. '<|im_end|>')."""
        buf = ctypes.create_string_buffer(256)
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, True)
        return buf.raw[: max(n, 0)].decode("utf-8", errors="replace")

    def detokenize(self, tokens: list[int], param: str = "tokens") -> str:
        self.check_ids(tokens, param)
        return b"".join(self.piece(t) for t in tokens).decode("utf-8", errors="replace")

    def special_pieces(self) -> list[bytes]:
        """Every token's bytes with special tokens rendered, by id: the text llama.cpp's grammar code
        sees for a token. Built once (~0.1 s for 50k tokens), on the first lazy grammar's preparation."""
        if self._special is None:
            with self._lock:
                if self._special is None:
                    buf = ctypes.create_string_buffer(256)
                    pieces = []
                    for tok in range(self.n_vocab):
                        n = llama_cpp.llama_token_to_piece(self.vocab, tok, buf, len(buf), 0, True)
                        if n < 0:
                            big = ctypes.create_string_buffer(-n)
                            n = llama_cpp.llama_token_to_piece(self.vocab, tok, big, len(big), 0, True)
                            pieces.append(big.raw[:n])
                        else:
                            pieces.append(buf.raw[:n])
                    eog = set(self.eog_tokens())
                    spelling: dict[bytes, int] = {}
                    for tok, piece in enumerate(pieces):
                        if piece and len(piece) <= _SPELL_MAX and tok not in eog:
                            spelling.setdefault(piece, tok)
                    self._spelling = spelling
                    self._special = pieces
        return self._special

    def spell(self, text: bytes) -> list[int] | None:
        """Token ids (no end-of-generation ones) whose special pieces make up exactly `text`, or None when
        the vocabulary cannot; any spelling will do (a grammar checks characters, not ids)."""
        self.special_pieces()
        spelling = self._spelling
        n = len(text)
        came_from: list[tuple[int, int] | None] = [None] * (n + 1)  # position -> (previous position, id)
        came_from[0] = (0, -1)
        for i in range(n):
            if came_from[i] is None:
                continue
            for j in range(min(n, i + _SPELL_MAX), i, -1):
                if came_from[j] is None and (tok := spelling.get(text[i:j])) is not None:
                    came_from[j] = (i, tok)
        if came_from[n] is None:
            return None
        ids = []
        while n:
            n, tok = came_from[n]
            ids.append(tok)
        return ids[::-1]

    def eog_tokens(self) -> list[int]:
        if self._eog is None:
            self._eog = [t for t in range(self.n_vocab) if llama_cpp.llama_vocab_is_eog(self.vocab, t)]
        return self._eog


class Detokenizer:
    """Turns a sequence's tokens into text one token at a time, in O(1) per token.

    A character can span several tokens (most CJK characters do in byte-level BPE); the incremental
    UTF-8 decoder holds the incomplete bytes back until the character is whole.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self._decoder.decode(self._tokenizer.piece(token))

    def flush(self) -> str:
        """The end of the sequence. Bytes still held back are the start of a character the generation
        stopped inside (max_tokens, a cancel): dropped, not shown as U+FFFD."""
        self._decoder.reset()
        return ""

"""Text <-> token ids for a GGUF model, done by the ``sentencepiece`` library itself.

A GGUF file carries no ``tokenizer.model``: llama.cpp stores the vocabulary as metadata
(``tokenizer.ggml.tokens`` / ``.scores`` / ``.token_type``). We rebuild a sentencepiece
``ModelProto`` from it in memory and load that into ``SentencePieceProcessor``, so encoding and
decoding are sentencepiece's own, not a reimplementation:

    tok = Tokenizer.from_gguf("gemma-3-270m.gguf")
    tok.encode("Hello")  # [2, 9259]: BOS as the file asks;  tok.decode([2, 9259]) == "Hello"

Only ``tokenizer.ggml.model == "llama"`` (SentencePiece) is supported. What makes the ids equal
llama.cpp's and transformers':

* ``model_type = BPE``: llama.cpp's SPM tokenizer merges adjacent symbols by the score of the
  merged piece, which is sentencepiece's BPE encoder (Unigram would run Viterbi instead).
* normalizer ``identity``, ``add_dummy_prefix = add_space_prefix``, no whitespace removal,
  spaces escaped to U+2581: llama.cpp normalises nothing beyond that escaping.
* piece types are llama.cpp's numbers, which are sentencepiece's; user-defined pieces get their
  spaces escaped back to U+2581 (llama.cpp's converter writes Gemma's ``"▁▁"`` as ``"  "``), and
  the unknown-token id is made type UNKNOWN (sentencepiece needs one; Gemma's file says CONTROL).
* ``byte_fallback`` is on when the vocabulary has ``<0xXX>`` byte pieces.

Control tokens (``<start_of_turn>``, ``<bos>`` ...) written in the text are matched whole by
default, as llama.cpp and transformers do; sentencepiece never matches control pieces, so the text
is cut at them first and each run between them is encoded by sentencepiece.

The header is read by ``engine.model.gguf_file`` (pass ``GGUFModel.reader`` to read it once).
Building the model for a 262,144-token vocabulary takes 0.2 s; the serialized model is kept in
the derived cache (``engine.cache``, 5 MB for that vocabulary), keyed by the file's identity
and checked when read, and reused by the next ``from_gguf`` of the same file.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.model.gguf_file import Field, GGUFError, GGUFFile, printable

__all__ = ["StreamDecoder", "Tokenizer", "TokenizerError"]

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_KEY = "tokenizer.ggml."
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_REQUIRED = object()  # "no default": the key must be there
_INTS = ("UINT8", "INT8", "UINT16", "INT16", "UINT32", "INT32", "UINT64", "INT64")
_FLOATS = ("FLOAT32", "FLOAT64")
#: Control tokens that end a turn in the chat formats we know, besides ``eos``.
EOT_PIECES = ("<end_of_turn>", "<|eot_id|>", "<|im_end|>", "<|end|>", "<|endoftext|>")
#: Names the derived-cache entries of the serialized model; bump it when ``_model_proto``
#: changes what it builds, so entries made by an older version are not used.
CACHE_KIND = "spm-proto-1"


class TokenizerError(ValueError):
    """The file's tokenizer metadata is missing, mistyped or of an unsupported kind."""


@dataclass(frozen=True)
class _Vocab:
    """What we read from the file, already checked."""

    tokens: list[str]
    scores: list[float]
    types: list[int]
    bos: int
    eos: int
    unk: int
    pad: int | None
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool


def _getter(fields: Mapping[str, Field], source: str) -> Any:
    """``get(key, kinds, array, default)``: a checked value of ``tokenizer.ggml.<key>``."""

    def error(key: str, what: str) -> TokenizerError:
        return TokenizerError(f"{source}: tokenizer metadata {_KEY}{key}: {what}")

    def get(key: str, kinds: tuple, array: bool = False, default: Any = _REQUIRED) -> Any:
        field = fields.get(_KEY + key)
        if field is None:
            if default is _REQUIRED:
                raise error(key, "missing")
            return default
        kind = field.item_kind if field.is_array else field.kind
        if field.is_array != array or kind not in kinds:
            want = ("array of " if array else "") + "/".join(kinds)
            raise error(key, f"expected {want}, got {field.type_name}")
        if kind != "STRING":
            return field.value.tolist() if array else field.value
        try:
            return field.value.decode() if array else field.text()
        except UnicodeDecodeError as e:
            raise error(key, f"not UTF-8 ({e})") from None

    return get, error


def _read_vocab(fields: Mapping[str, Field], source: str) -> _Vocab:
    """The checked vocabulary; every failure is a ``TokenizerError`` naming file and key."""
    get, error = _getter(fields, source)
    kind = get("model", ("STRING",))
    if kind != "llama":
        raise error(
            "model", f"tokenizer kind '{printable(kind, 40)}' is not supported: only 'llama' (SPM)"
        )
    tokens = get("tokens", ("STRING",), array=True)
    n = len(tokens)
    scores = get("scores", _FLOATS, array=True)
    types = get("token_type", _INTS, array=True)
    for key, values in (("scores", scores), ("token_type", types)):
        if len(values) != n:
            raise error(key, f"{len(values)} entries for {n} tokens")
    bad = sorted(set(types) - {NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE})
    if bad:
        raise error("token_type", f"unknown token types {bad[:5]} (llama.cpp uses 1..6)")
    for i in _ids_of(types, BYTE):
        if not _BYTE_PIECE.fullmatch(tokens[i]):
            raise error("tokens", f"byte token {i} is '{printable(tokens[i], 40)}', not <0xXX>")

    def token_id(key: str, default: Any = _REQUIRED) -> Any:
        value = get(key, _INTS, default=default)
        if value is not None and not 0 <= value < n:
            raise error(key, f"id {value} outside the vocabulary of {n}")
        return value

    unk = token_id("unknown_token_id", None)
    if unk is None:  # sentencepiece needs one: take the vocabulary's only UNKNOWN-type token
        unknown = _ids_of(types, UNKNOWN)
        if len(unknown) != 1:
            raise error("unknown_token_id", "missing, and no single token of type unknown")
        unk = unknown[0]
    return _Vocab(
        tokens=tokens,
        scores=scores,
        types=types,
        bos=token_id("bos_token_id"),
        eos=token_id("eos_token_id"),
        unk=unk,
        pad=token_id("padding_token_id", None),
        add_bos=get("add_bos_token", ("BOOL",), default=True),  # llama.cpp's default for SPM
        add_eos=get("add_eos_token", ("BOOL",), default=False),
        add_space_prefix=get("add_space_prefix", ("BOOL",), default=True),  # likewise
    )


def _ids_of(types: list[int], kind: int) -> list[int]:
    """Ids of the tokens of type ``kind`` (a vocabulary has few of each but NORMAL)."""
    return np.flatnonzero(np.asarray(types) == kind).tolist()


def _model_proto(v: _Vocab) -> bytes:
    """The sentencepiece model the vocabulary describes (the choices: see the module docstring)."""
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except Exception as e:  # no protobuf, or protobuf's VersionError: runtime older than gencode
        raise ImportError(f"sentencepiece_model_pb2 needs a matching protobuf: {e}") from e

    m = pb.ModelProto()
    t = m.trainer_spec
    t.model_type = pb.TrainerSpec.BPE
    t.vocab_size = len(v.tokens)
    t.byte_fallback = BYTE in v.types
    t.unk_id, t.bos_id, t.eos_id = v.unk, v.bos, v.eos
    t.pad_id = -1 if v.pad is None else v.pad
    t.unk_piece, t.bos_piece, t.eos_piece = v.tokens[v.unk], v.tokens[v.bos], v.tokens[v.eos]
    if v.pad is not None:
        t.pad_piece = v.tokens[v.pad]
    ns = m.normalizer_spec
    ns.name, ns.add_dummy_prefix = "identity", v.add_space_prefix
    ns.remove_extra_whitespaces, ns.escape_whitespaces = False, True
    add = m.pieces.add  # the fastest way to fill 262k pieces (~0.3 s)
    for tok, score, ty in zip(v.tokens, v.scores, v.types, strict=True):
        add(piece=tok.replace(" ", "\u2581") if ty == USER_DEFINED else tok, score=score, type=ty)
    m.pieces[v.unk].type = UNKNOWN
    return m.SerializeToString()


class Tokenizer:
    """A GGUF model's SentencePiece tokenizer (build with ``Tokenizer.from_gguf``)."""

    def __init__(self, vocab: _Vocab, source: str = "<memory>", proto: bytes | None = None) -> None:
        """``proto``: the serialized model ``_model_proto(vocab)`` builds, where already made
        (from the derived cache); None builds it."""
        import sentencepiece as spm

        self._v, self.source = vocab, source
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=proto or _model_proto(vocab))
        except (RuntimeError, OSError) as e:
            raise TokenizerError(f"{source}: sentencepiece rejected the vocabulary: {e}") from e
        specials = set(_ids_of(vocab.types, CONTROL))
        specials |= {i for i in (vocab.bos, vocab.eos, vocab.unk, vocab.pad) if i is not None}
        #: ids that are rendered as their literal text (or dropped), never by sentencepiece
        self._special_ids = frozenset(specials)
        self._special_text = {vocab.tokens[i]: i for i in sorted(specials) if vocab.tokens[i]}
        firsts = sorted({s[0] for s in self._special_text})
        self._special_start = re.compile("|".join(map(re.escape, firsts)) or "(?!)")
        self._special_lens = sorted({len(s) for s in self._special_text}, reverse=True)
        self._byte = {
            i: int(_BYTE_PIECE.fullmatch(vocab.tokens[i]).group(1), 16)  # type: ignore[union-attr]
            for i in _ids_of(vocab.types, BYTE)
        }

    @classmethod
    def from_gguf(cls, source: str | Path | GGUFFile | Any) -> Tokenizer:
        """From a GGUF path, or a file already open: ``GGUFModel.reader`` (a
        ``engine.model.gguf_file.GGUFFile``, so a model loader reads the header once), a
        ``GGUFModel`` itself, or a ``gguf.GGUFReader`` (its file is read again, by the fast
        reader). The sentencepiece model is taken from the derived cache (``engine.cache``)
        where this file's was built before, and stored there when built."""
        file = _open(source)
        name = str(file.path)
        vocab = _read_vocab(file.fields, name)
        key = _cache_key(file)
        proto = _cached_proto(key)
        if proto is not None:
            try:
                return cls(vocab, name, proto)
            except TokenizerError:
                pass  # a valid entry sentencepiece refuses: rebuild it, below
        proto = _model_proto(vocab)
        tok = cls(vocab, name, proto)
        if key is not None:
            from engine.cache import store_derived

            store_derived(CACHE_KIND, key, proto)
        return tok

    @property
    def n_vocab(self) -> int:
        """Number of token ids (the model's embedding rows)."""
        return len(self._v.tokens)

    @property
    def add_bos(self) -> bool:
        """Whether the file asks for BOS before every text (``tokenizer.ggml.add_bos_token``)."""
        return self._v.add_bos

    @property
    def bos_id(self) -> int:
        """Begin-of-sequence id (added by ``encode`` as ``add_bos`` / the file says)."""
        return self._v.bos

    @property
    def eos_id(self) -> int:
        return self._v.eos

    @property
    def unk_id(self) -> int:
        return self._v.unk

    @property
    def pad_id(self) -> int | None:
        """Padding id, or None where the file names none."""
        return self._v.pad

    @property
    def eot_ids(self) -> frozenset[int]:
        """Ids that end generation: ``eos``, plus those of the control tokens in ``EOT_PIECES``
        (Gemma's ``<end_of_turn>``, Llama 3's ``<|eot_id|>``, ChatML's ``<|im_end|>``, Phi's
        ``<|end|>``, ``<|endoftext|>``) that this vocabulary has as control tokens."""
        ids = {self._special_text[p] for p in EOT_PIECES if p in self._special_text}
        return frozenset(ids | {self._v.eos})

    def piece(self, id: int) -> str:
        """The token's text as stored in the file (``"▁the"``, ``"<0x0A>"``, ``"<eos>"``)."""
        if not 0 <= id < self.n_vocab:
            raise IndexError(f"token id {id} outside the vocabulary of {self.n_vocab}")
        return self._v.tokens[id]

    def encode(self, text: str, add_bos: bool | None = None, *, special: bool = True) -> list[int]:
        """Token ids of ``text``.

        ``add_bos=None`` follows the file's ``add_bos_token`` and ``add_eos_token`` flags;
        ``True``/``False`` adds BOS or not, and never EOS. With ``special`` (the default, as in
        llama.cpp and transformers) control-token text such as ``<start_of_turn>`` becomes that
        token; ``special=False`` keeps it plain text, for untrusted input.
        """
        ids: list[int] = []
        if add_bos if add_bos is not None else self._v.add_bos:
            ids.append(self._v.bos)
        for part in self._split_special(text) if special else [text]:
            if isinstance(part, int):
                ids.append(part)
            else:
                ids += self._sp.encode(part)
        if add_bos is None and self._v.add_eos:
            ids.append(self._v.eos)
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Text of ``ids``. Control tokens (and bos/eos/unk/pad) are dropped with
        ``skip_special``, else written as their literal text; everything else is decoded by
        sentencepiece, one run between control tokens at a time (invalid UTF-8 from byte pieces
        becomes U+FFFD)."""
        ids = [int(i) for i in ids]
        if ids and not 0 <= min(ids) <= max(ids) < self.n_vocab:
            bad = next(i for i in ids if not 0 <= i < self.n_vocab)
            raise IndexError(f"token id {bad} outside the vocabulary of {self.n_vocab}")
        if self._special_ids.isdisjoint(ids):  # the common case, without a Python loop
            return self._sp.decode(ids)
        out, start = [], 0
        for k, i in enumerate(ids):
            if i in self._special_ids:
                out += [self._sp.decode(ids[start:k]), "" if skip_special else self._v.tokens[i]]
                start = k + 1
        return "".join(out) + self._sp.decode(ids[start:])

    def stream(self, skip_special: bool = True) -> StreamDecoder:
        """A decoder for ids that arrive one by one during generation."""
        return StreamDecoder(self, skip_special)

    def _split_special(self, text: str) -> Iterable[str | int]:
        """``text`` as plain-text runs and control-token ids, longest token first at each place."""
        start = pos = 0
        while m := self._special_start.search(text, pos):
            pos = m.start()
            for n in self._special_lens:
                tid = self._special_text.get(text[pos : pos + n])
                if tid is not None:
                    if pos > start:
                        yield text[start:pos]
                    yield tid
                    start = pos = pos + n
                    break
            else:
                pos += 1
        if start < len(text):
            yield text[start:]


def _open(source: str | Path | GGUFFile | Any) -> GGUFFile:
    """The parsed header of whatever ``Tokenizer.from_gguf`` was given."""
    if isinstance(source, GGUFFile):
        return source
    if isinstance(getattr(source, "reader", None), GGUFFile):  # a GGUFModel
        return source.reader
    path = source
    if not isinstance(source, str | Path):  # a gguf.GGUFReader: its memory map knows the file
        path = getattr(getattr(source, "data", None), "filename", None)
        if path is None:
            raise TypeError(f"from_gguf takes a path or an open GGUF file, not {type(source)}")
    try:
        return GGUFFile(path)
    except GGUFError as e:
        raise TokenizerError(str(e)) from None


def _cache_key(file: GGUFFile) -> str | None:
    from engine.cache import file_key

    try:
        return f"{file_key(file.path, file.header_digest())}"
    except OSError:  # the file vanished since it was read: build without the cache
        return None


def _cached_proto(key: str | None) -> bytes | None:
    from engine.cache import load_derived

    return load_derived(CACHE_KIND, key) if key is not None else None


class StreamDecoder:
    """Generated ids in, text increments out, for printing as tokens arrive.

    Byte-fallback tokens of one multibyte character arrive one at a time; ``push`` holds back a
    trailing incomplete UTF-8 sequence (never emitting part of a character) and ``flush`` releases
    whatever is held at the end. The increments joined are exactly ``decode(all_ids)``.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True) -> None:
        self._tok, self._skip = tokenizer, skip_special
        self._ids: list[int] = []
        self._anchor = 0  # decoding restarts here: text before it is final
        self._done = 0  # characters of decode(ids[anchor:...]) already emitted
        # Without a dummy prefix sentencepiece decodes piece by piece, so any point after a
        # complete character is a restart point; with one it strips the first piece's leading
        # space, so only the start of a run (after a control token) is.
        self._restart_anywhere = not tokenizer._v.add_space_prefix

    def push(self, ids: int | Iterable[int]) -> str:
        """Add newly generated id(s); return the text that is now certain."""
        self._ids += [int(i) for i in ids] if isinstance(ids, Iterable) else [int(ids)]
        return self._emit(self._complete_end())

    def flush(self) -> str:
        """The held-back rest, at the end of generation (invalid bytes become U+FFFD)."""
        return self._emit(len(self._ids))

    def _emit(self, end: int) -> str:
        end = max(end, self._anchor)
        text = self._tok.decode(self._ids[self._anchor : end], self._skip)
        new = text[self._done :]
        self._done = len(text)
        if end > self._anchor and (
            self._restart_anywhere or self._ids[end - 1] in self._tok._special_ids
        ):
            self._anchor, self._done = end, 0
        return new

    def _complete_end(self) -> int:
        """End of the ids whose text later ids cannot change: before a trailing lead byte that
        still lacks continuation bytes."""
        byte = self._tok._byte
        n = len(self._ids)
        for k in range(1, min(4, n) + 1):
            b = byte.get(self._ids[n - k])
            if b is None:
                return n
            if b & 0xC0 != 0x80:  # not a continuation byte: the last lead (or ASCII) byte
                need = 2 if b < 0xE0 else 3 if b < 0xF0 else 4
                return n - k if b >= 0xC0 and need > k else n
        return n

"""Read GGUF model files: hyper-parameters into a ``ModelConfig``, tensors into NumPy arrays.

    model = open_gguf("gemma-3-270m-q4_k_m.gguf")
    print(model.describe())                  # architecture, hyper-parameters, bytes per type
    weights = model.weights()                # GGUF names -> arrays, ready for engine.Session
    tok = Tokenizer.from_gguf(model.reader)  # the same header, read once

The header is walked by ``engine.model.gguf_file`` (by hand: 0.1 s where ``gguf.GGUFReader``
took 12 s over Gemma 3's 262,144-token vocabulary); dequantization is the ``gguf`` package's,
run in row chunks on every core by ``engine.model.dequant``. What this module adds is
checking: every problem with a file (truncated, wrong magic, a tensor whose bytes do not match
its shape and type, a missing tensor, an unsupported quantization, metadata of the wrong type,
an unknown architecture, hyper-parameters that make no sense: a non-finite or non-positive
epsilon or rope base, head counts that do not divide) is one ``GGUFError`` naming the file and
the key or tensor, raised before any weight is handed out; a NaN or Inf in a weight is one
naming the tensor, raised when it is dequantized.

Strings from the file that reach a terminal (``describe()``, ``metadata()``, the config's
``name``) pass through ``printable``: a model file is untrusted input.

F32 tensors stay memory-mapped (no copy); block-quantized ones are dequantized when asked for,
into f32 (or the requested f16/bf16).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from backends.base import Quantized
from engine.model.dequant import NonFinite, TensorJob, check_blocks, dequantize_many
from engine.model.gguf_file import Field, GGUFError, GGUFFile, printable
from engine.model.weights import concat_rows, tie_output
from graph.dtypes import DTYPES, DType, dtype_of, f16, f32
from graph.models import STACKED, ModelConfig, stacked_parts, weight_shapes

__all__ = [
    "GGUFError",
    "GGUFModel",
    "TensorInfo",
    "open_gguf",
    "printable",
    "SUPPORTED_ARCHES",
    "SUPPORTED_TYPES",
]

SUPPORTED_ARCHES = ("llama", "gemma3")
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
SUPPORTED_TYPES += ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
NAME_LIMIT = 80  # characters of general.name shown


@dataclass(frozen=True, slots=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # NumPy order: GGUF's ne reversed, so matrices are (out, in)
    ggml_type: str  # "Q4_K", "F32", ...
    dtype: DType  # our storage type for it
    n_bytes: int
    offset: int  # bytes from the start of the file


class GGUFModel:
    """An open GGUF file: its metadata, its tensor table and the config of the model it holds.

    ``reader`` is the parsed header (``engine.model.gguf_file.GGUFFile``): hand it to
    ``Tokenizer.from_gguf`` so the file is read once."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.reader = GGUFFile(self.path)
        self.tensors = self._tensor_table()
        self.arch = self.get_str("general.architecture")
        if self.arch not in SUPPORTED_ARCHES:
            raise self.error(
                f"architecture '{printable(self.arch, 40)}' is not supported; "
                f"supported: {', '.join(SUPPORTED_ARCHES)}"
            )
        self.n_ctx_train: int | None = None  # {arch}.context_length, where the file says
        self.config = self._config()
        self._check_tensors()

    def error(self, what: str) -> GGUFError:
        return GGUFError(f"{self.path}: {what}")

    # -- structure -------------------------------------------------------------------------------
    def _tensor_table(self) -> dict[str, TensorInfo]:
        table: dict[str, TensorInfo] = {}
        for t in self.reader.tensors.values():
            kind = t.ggml_type.name
            if kind not in SUPPORTED_TYPES:
                raise self.error(
                    f"tensor {printable(t.name, 100)} has type {kind}, which cannot be "
                    f"dequantized here; supported: {', '.join(SUPPORTED_TYPES)}"
                )
            table[t.name] = TensorInfo(
                t.name, t.shape, kind, DTYPES[kind.lower()], t.n_bytes, t.offset
            )
        # As llama.cpp: tensor data is contiguous, each tensor padded to the alignment, so a
        # tensor with more or fewer bytes than its shape and type need shows as a gap or overlap.
        align = self.reader.alignment
        end, a = self.reader.data_offset, None
        spans = sorted((i.offset, i.offset + i.n_bytes, i.name) for i in table.values())
        for start, next_end, b in spans:
            if a is not None and start < end:
                raise self.error(f"tensors {a} and {b} overlap: their byte sizes do not match")
            if start > -(-end // align) * align:
                where = f"after tensor {a}" if a is not None else "at the start of the data"
                raise self.error(
                    f"{start - end} bytes {where} belong to no tensor (before {b}): "
                    "tensor byte sizes do not match their shapes and types"
                )
            end, a = next_end, b
        return table

    # -- metadata --------------------------------------------------------------------------------
    def has(self, key: str) -> bool:
        return key in self.reader.fields

    def field(self, key: str) -> Field | None:
        """The raw metadata value (``engine.model.gguf_file.Field``), or None."""
        return self.reader.fields.get(key)

    def _get(self, key: str, kinds: tuple[str, ...], what: str, default: Any) -> Any:
        f = self.reader.fields.get(key)
        if f is None:
            if default is _REQUIRED:
                raise self.error(f"metadata key {key} is missing")
            return default
        if f.kind not in kinds:
            raise self.error(f"metadata {key} should be {what}, found {f.kind}")
        return f

    def get_int(self, key: str, default: Any = None) -> int:
        f = self._get(key, _INT_TYPES, "an integer", _REQUIRED if default is None else default)
        return int(f.value) if isinstance(f, Field) else f

    def get_float(self, key: str, default: Any = None) -> float:
        kinds = _INT_TYPES + ("FLOAT32", "FLOAT64")
        f = self._get(key, kinds, "a number", _REQUIRED if default is None else default)
        return float(f.value) if isinstance(f, Field) else f

    def get_str(self, key: str, default: Any = None) -> str:
        f = self._get(key, ("STRING",), "a string", _REQUIRED if default is None else default)
        if not isinstance(f, Field):
            return f
        try:
            return f.text()
        except UnicodeDecodeError:
            raise self.error(f"metadata {key} is not UTF-8: {printable(f.value, 60)}") from None

    def get_bool(self, key: str, default: Any = None) -> bool:
        f = self._get(key, ("BOOL",), "a boolean", _REQUIRED if default is None else default)
        return bool(f.value) if isinstance(f, Field) else f

    def metadata(self) -> dict[str, Any]:
        """Every key with a short rendering of its value (arrays abbreviated), keys and strings
        made ``printable``: safe to print."""
        out: dict[str, Any] = {}
        for key, f in self.reader.fields.items():
            if f.is_array:
                value: Any = f"[{len(f.value)} {f.item_kind} items]"
            elif f.kind == "STRING":
                value = printable(f.value, 200)
            else:
                value = f.value
            out[printable(key, 200)] = value
        return out

    # -- the model -------------------------------------------------------------------------------
    def _positive(self, key: str, default: Any = None) -> int:
        value = self.get_int(key, default)
        if value < 1:
            raise self.error(f"metadata {key} is {value}; it must be positive")
        return value

    def _finite(self, key: str, default: float, below: float = math.inf) -> float:
        """A float hyper-parameter that must be finite, positive, and under ``below``."""
        value = self.get_float(key, default)
        if not (math.isfinite(value) and 0 < value < below):
            bound = f" and below {below:g}" if math.isfinite(below) else ""
            raise self.error(
                f"metadata {key} is {value:g}; it must be a finite number above 0{bound}"
            )
        return value

    def _heads(self) -> dict[str, int]:
        a = self.arch
        n_embd = self._positive(f"{a}.embedding_length")
        n_head = self._positive(f"{a}.attention.head_count")
        n_head_kv = self._positive(f"{a}.attention.head_count_kv", n_head)
        if n_head % n_head_kv:
            raise self.error(
                f"metadata {a}.attention.head_count {n_head} and head_count_kv {n_head_kv}: "
                f"{n_head} heads are not a multiple of {n_head_kv} kv heads"
            )
        if not self.has(f"{a}.attention.key_length") and n_embd % n_head:
            raise self.error(
                f"metadata {a}.attention.key_length is missing, and {a}.embedding_length "
                f"{n_embd} is not a multiple of {n_head} heads to derive it from"
            )
        head_dim = self._positive(f"{a}.attention.key_length", n_embd // n_head)
        if self.get_int(f"{a}.attention.value_length", head_dim) != head_dim:
            raise self.error("attention.value_length differs from key_length; not supported")
        n_rot = self.get_int(f"{a}.rope.dimension_count", head_dim)
        if n_rot != head_dim:
            raise self.error(f"rope.dimension_count {n_rot} != head dim {head_dim}; not supported")
        return dict(n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv, head_dim=head_dim)

    def _vocab(self) -> int:
        emb = self.tensors.get("token_embd.weight")
        if emb is None:
            raise self.error("tensor token_embd.weight is missing")
        if len(emb.shape) != 2 or emb.shape[0] < 1:
            raise self.error(
                f"tensor token_embd.weight has shape {emb.shape}, not (n_vocab, n_embd)"
            )
        return emb.shape[0]

    def _name(self) -> str:
        f = self.reader.fields.get("general.name")
        if f is None or f.kind != "STRING":
            return printable(self.path.stem, NAME_LIMIT)
        return printable(f.value, NAME_LIMIT)

    def _config(self) -> ModelConfig:
        a = self.arch
        heads = self._heads()
        n_layer = self._positive(f"{a}.block_count")
        if n_layer > len(self.tensors):  # each layer has several tensors
            raise self.error(
                f"metadata {a}.block_count is {n_layer}, "
                f"but the file holds only {len(self.tensors)} tensors"
            )
        if self.has(f"{a}.context_length"):
            self.n_ctx_train = self._positive(f"{a}.context_length")
        common: dict[str, Any] = dict(
            arch=a,
            n_vocab=self._vocab(),
            n_layer=n_layer,
            n_ff=self._positive(f"{a}.feed_forward_length"),
            rms_eps=self._finite(f"{a}.attention.layer_norm_rms_epsilon", 1e-6, below=1.0),
            rope_base=self._finite(f"{a}.rope.freq_base", 10000.0),
            tied_embeddings="output.weight" not in self.tensors,
            name=self._name(),
            **heads,
        )
        if self.get_str(f"{a}.rope.scaling.type", "linear") == "linear":
            scaling = f"{a}.rope.scaling.factor"
            # 0 means "no scaling", as llama.cpp reads it
            if self.get_float(scaling, 1.0) != 0:
                common["rope_freq_scale"] = 1.0 / self._finite(scaling, 1.0)
        if a == "gemma3":
            # As llama.cpp: local layers use base 1e4, every 6th layer is global, and the
            # attention scale is 1/sqrt(head_dim) (query_pre_attn_scalar = head_dim).
            window = self.get_int(f"{a}.attention.sliding_window", 0)
            if window < 0:
                raise self.error(
                    f"metadata {a}.attention.sliding_window is {window}; it must be >= 0"
                )
            common.update(
                rope_base_swa=self._finite(f"{a}.rope.freq_base_swa", 10000.0),
                sliding_window=window,
                swa_pattern=6,
                attn_scale=heads["head_dim"] ** -0.5,
            )
        try:
            return ModelConfig(**common)
        except ValueError as e:
            raise self.error(str(e)) from None

    def _check_tensors(self) -> None:
        for name, shape in weight_shapes(self.config).items():
            if name == "output.weight" and self.config.tied_embeddings:
                continue
            info = self.tensors.get(name)
            if info is None:
                raise self.error(f"tensor {name} is missing ({self.arch} needs it)")
            if info.shape != shape:
                raise self.error(
                    f"tensor {name} has shape {info.shape}, the {self.arch} graph expects {shape}"
                )

    # -- tensors ---------------------------------------------------------------------------------
    def bytes_by_type(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.tensors.values():
            out[t.ggml_type] = out.get(t.ggml_type, 0) + t.n_bytes
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def _job(self, name: str, dtype: DType, out: np.ndarray | None = None) -> TensorJob:
        entry = self.reader.tensors[name]
        raw = self.reader.tensor_bytes(entry)
        return TensorJob(name, raw, entry.ggml_type, entry.shape, np.dtype(dtype.numpy), out)

    def _decode(
        self, jobs: list[TensorJob], progress: Callable[[str], None] | None = None
    ) -> dict[str, np.ndarray]:
        try:
            return dequantize_many(jobs, progress)
        except NonFinite as e:
            raise self.error(str(e)) from None

    def tensor(self, name: str, dtype: DType | str = f32) -> np.ndarray:
        """Tensor ``name`` as a NumPy array of ``dtype`` (f32: memory-mapped where stored so)."""
        if name not in self.tensors:
            raise self.error(f"tensor {printable(name, 100)} is missing")
        return self._decode([self._job(name, dtype_of(dtype))])[name]

    def stored_config(
        self, readable: Collection[str] | None = None, fallback: DType = f16
    ) -> ModelConfig:
        """The config with every matrix in the file's own type (``ModelConfig.weight_types``),
        what a backend that reads block types runs (``weights_as`` gives its weights). A block
        type not in ``readable`` (None: all are) is dequantized to ``fallback`` instead."""
        matrices = [n for n, s in weight_shapes(self.config).items() if len(s) == 2]
        types = []
        for n in matrices:
            if n in self.tensors:
                t = self.tensors[n].dtype
                keep = not t.is_quantized or readable is None or t.name in readable
                types.append((n, t if keep else fallback))
        return self.config.replace(weight_types=tuple(types))

    def _stored(self, name: str) -> Any:
        """A matrix as the file stores it, without a copy: a ``Quantized`` over the mapped
        block bytes, or a view of F32/F16/BF16 values."""
        info = self.tensors[name]
        raw = self.reader.tensor_bytes(self.reader.tensors[name])
        if info.dtype.is_quantized:
            rows = raw.reshape(*info.shape[:-1], info.dtype.nbytes((info.shape[-1],)))
            return Quantized(rows, info.dtype, info.shape)
        return raw.view(info.dtype.numpy).reshape(info.shape)

    def weights(
        self,
        dtype: DType | str | None = None,
        progress: Callable[[str, int, int], None] | None = None,
        *,
        stack: bool = False,
    ) -> dict[str, Any]:
        """Every weight the graph needs: matrices in ``dtype`` (default f32), norms in f32;
        dequantized on every core, each checked for NaN/Inf. ``progress(name, done, total)``
        follows the file's tensors.

        ``stack``: the projections ``graph.models.STACKED`` groups (Q/K/V, gate/up) as one
        matrix each, named as ``weight_shapes(config, stack=True)`` names them, their parts
        decoded straight into its rows: a ``Session`` with ``stack`` (its default) then uses
        them as they are, where it would otherwise concatenate a copy (0.1-0.5 s and 260 MB
        for Gemma 3 270M)."""
        mat = dtype_of(dtype) if dtype is not None else f32
        shapes = weight_shapes(self.config)
        names = [n for n in shapes if n in self.tensors]
        dtypes = {n: mat if len(shapes[n]) == 2 else f32 for n in names}
        rows, stacked = self._stacked(mat) if stack else ({}, {})
        done: list[str] = []

        def step(name: str) -> None:
            done.append(name)
            if progress is not None:
                progress(name, len(done), len(names))

        jobs = [self._job(n, dtypes[n], rows.get(n)) for n in names]
        arrays = self._decode(jobs, step)
        out = {n: a for n, a in arrays.items() if n not in rows} | stacked
        return tie_output(self.config, out)

    def weights_as(
        self,
        cfg: ModelConfig,
        progress: Callable[[str, int, int], None] | None = None,
        *,
        stack: bool = False,
    ) -> dict[str, Any]:
        """Every weight the graph needs, stored as ``cfg`` says (``ModelConfig.weight_dtype``;
        ``stored_config`` makes such a config): a matrix kept in the file's type is handed out
        as stored (``_stored``: no copy, nothing decoded), any other decoded into its type.
        With ``stack``, groups whose parts share a type (``ModelConfig.stacks``) are copies of
        their parts' rows."""
        shapes = weight_shapes(cfg)
        names = [n for n in shapes if n in self.tensors]
        kept = [
            n
            for n in names
            if cfg.weight_dtype(n) == self.tensors[n].dtype and self.tensors[n].dtype.is_quantized
        ]
        # the rest decoded, or viewed where the type is already right (F32/F16), and checked
        jobs = [self._job(n, cfg.weight_dtype(n)) for n in names if n not in kept]
        out: dict[str, Any] = self._decode(jobs)
        for i, n in enumerate(names):
            if n in kept:
                out[n] = self._stored(n)
                try:  # blocks kept as stored: checked by their scales
                    check_blocks(n, out[n].data, self.reader.tensors[n].ggml_type)
                except NonFinite as e:
                    raise self.error(str(e)) from None
            if progress is not None:
                progress(n, i + 1, len(names))
        if stack:
            for name in weight_shapes(cfg, stack=True):
                parts = stacked_parts(name)
                if parts and name not in out:
                    out[name] = concat_rows([out.pop(p) for p in parts])
        return tie_output(cfg, out)

    def _stacked(self, dtype: DType) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """({part: its rows of the stacked matrix}, {stacked name: matrix}) for each group of
        ``STACKED`` in each layer (every part is here, of the shape the graph expects: checked
        when the file was opened)."""
        rows: dict[str, np.ndarray] = {}
        stacked: dict[str, np.ndarray] = {}
        for layer in range(self.config.n_layer):
            for group, members in STACKED.items():
                parts = [f"blk.{layer}.{m}.weight" for m in members]
                heights = [self.tensors[p].shape[0] for p in parts]
                width = self.tensors[parts[0]].shape[1]
                matrix = np.empty((sum(heights), width), dtype.numpy)
                stacked[f"blk.{layer}.{group}.weight"] = matrix
                start = 0
                for p, n in zip(parts, heights, strict=True):
                    rows[p] = matrix[start : start + n]
                    start += n
        return rows, stacked

    def describe(self) -> str:
        c = self.config
        lines = [
            f"file:        {printable(str(self.path), 1000)}",
            f"model:       {c.name} ({c.arch})",
            f"layers:      {c.n_layer}, d={c.n_embd}, heads {c.n_head}/{c.n_head_kv} kv "
            f"of {c.head_dim}, ffn {c.n_ff}, vocab {c.n_vocab}",
            f"rope:        base {c.rope_base:g}"
            + (
                f", local {c.rope_base_swa:g}, window {c.sliding_window} on "
                f"{c.layer_kinds.count('swa')} of {c.n_layer} layers"
                if c.sliding_window
                else ""
            ),
            f"head:        {'tied to token_embd' if c.tied_embeddings else 'output.weight'}",
            f"parameters:  {c.n_params() / 1e6:.1f} M",
            f"tensors:     {len(self.tensors)}, "
            f"{sum(self.bytes_by_type().values()) / 2**20:.1f} MiB",
        ]
        if self.n_ctx_train is not None:
            lines.insert(3, f"context:     {self.n_ctx_train} tokens (trained)")
        for kind, n in self.bytes_by_type().items():
            count = sum(t.ggml_type == kind for t in self.tensors.values())
            lines.append(f"  {kind:<6} {count:>4} tensors  {n / 2**20:9.2f} MiB")
        return "\n".join(lines)


_REQUIRED = object()
_INT_TYPES = ("UINT8", "INT8", "UINT16", "INT16", "UINT32", "INT32", "UINT64", "INT64")


def config_for(model: GGUFModel, options: Any) -> ModelConfig:
    """The config a run of ``model`` with ``options`` uses: the file's own types where the
    backend reads them and no ``--dtype`` is asked for (``DeviceSpec.keeps_block_types``;
    types it cannot read become f16), else every matrix dequantized to ``--dtype`` (f32 by
    default)."""
    from backends import device_spec

    spec = device_spec(options.backend)
    if options.dtype is None and spec.keeps_block_types:
        return model.stored_config(spec.block_types)
    return model.config.replace(dtype=options.weight_dtype)


def open_gguf(path: str | Path) -> GGUFModel:
    """Open and check a GGUF model file (see ``GGUFModel``)."""
    return GGUFModel(path)

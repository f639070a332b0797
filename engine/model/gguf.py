"""Read GGUF model files: hyper-parameters into a ``ModelConfig``, tensors into NumPy arrays.

    model = open_gguf("gemma-3-270m-q4_k_m.gguf")
    print(model.describe())                  # architecture, hyper-parameters, bytes per type
    weights = model.weights()                # GGUF names -> arrays, ready for engine.Session

Parsing is the ``gguf`` package's (``GGUFReader``, memory-mapped); so is dequantization
(``gguf.quants.dequantize``). What this module adds is checking: every problem with a file
(truncated, wrong magic, a tensor whose bytes do not match its shape and type, a missing
tensor, an unsupported quantization, metadata of the wrong type, an unknown architecture) is
one ``GGUFError`` naming the file and the problem, raised before any weight is handed out.

F32 tensors stay memory-mapped (no copy); block-quantized ones are dequantized when asked for,
into f32 (or the requested f16/bf16).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.model.weights import tie_output
from graph.dtypes import DTYPES, DType, dtype_of, f32
from graph.models import ModelConfig, weight_shapes

__all__ = [
    "GGUFError",
    "GGUFModel",
    "TensorInfo",
    "open_gguf",
    "SUPPORTED_ARCHES",
    "SUPPORTED_TYPES",
]

SUPPORTED_ARCHES = ("llama", "gemma3")
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
SUPPORTED_TYPES += ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
_MAGIC = b"GGUF"


class GGUFError(ValueError):
    """A GGUF file that cannot be used; the message names the file and what is wrong."""


@dataclass(frozen=True, slots=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # NumPy order: GGUF's ne reversed, so matrices are (out, in)
    ggml_type: str  # "Q4_K", "F32", ...
    dtype: DType  # our storage type for it
    n_bytes: int
    offset: int  # bytes from the start of the file


def _gguf() -> Any:
    try:
        import gguf
    except ImportError:  # pragma: no cover - gguf is a dependency
        raise GGUFError("reading GGUF files needs the gguf package: pip install gguf") from None
    return gguf


class GGUFModel:
    """An open GGUF file: its metadata, its tensor table and the config of the model it holds."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._check_header()
        gguf = _gguf()
        try:
            self.reader = gguf.GGUFReader(str(self.path))
        except Exception as e:  # the reader raises ValueError/IndexError/... on corrupt files
            raise self.error(
                f"not a readable GGUF file: truncated or corrupt ({type(e).__name__}: {e})"
            ) from None
        self.tensors = self._tensor_table()
        self._raw = {t.name: t for t in self.reader.tensors}
        self.arch = self.get_str("general.architecture")
        if self.arch not in SUPPORTED_ARCHES:
            raise self.error(
                f"architecture {self.arch!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_ARCHES)}"
            )
        self.config = self._config()
        self._check_tensors()

    def error(self, what: str) -> GGUFError:
        return GGUFError(f"{self.path}: {what}")

    # -- structure -------------------------------------------------------------------------------
    def _check_header(self) -> None:
        try:
            with self.path.open("rb") as f:
                head = f.read(8)
        except OSError as e:
            raise GGUFError(f"{self.path}: cannot open ({e.strerror or e})") from None
        if len(head) < 8:
            raise self.error(f"file is {len(head)} bytes: too short to be GGUF")
        if head[:4] != _MAGIC:
            raise self.error(f"wrong magic {head[:4]!r}, expected {_MAGIC!r}: not a GGUF file")

    def _tensor_table(self) -> dict[str, TensorInfo]:
        gguf = _gguf()
        size = self.path.stat().st_size
        table: dict[str, TensorInfo] = {}
        for t in self.reader.tensors:
            kind = t.tensor_type.name
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            if kind not in SUPPORTED_TYPES:
                raise self.error(
                    f"tensor {t.name} has type {kind}, which cannot be dequantized here; "
                    f"supported: {', '.join(SUPPORTED_TYPES)}"
                )
            block, type_size = gguf.GGML_QUANT_SIZES[t.tensor_type]
            if shape and shape[-1] % block:
                raise self.error(f"tensor {t.name} rows of {shape[-1]} are not whole {kind} blocks")
            want = math.prod(shape) // block * type_size
            got = int(t.data.nbytes)
            if got != want or int(t.data_offset) + want > size:
                raise self.error(
                    f"tensor {t.name} {shape} {kind} needs {want} bytes at offset {t.data_offset}, "
                    f"the file holds {min(got, max(size - int(t.data_offset), 0))}: "
                    "truncated or corrupt"
                )
            table[t.name] = TensorInfo(
                t.name, shape, kind, DTYPES[kind.lower()], want, int(t.data_offset)
            )
        # As llama.cpp: tensor data is contiguous, each tensor padded to the alignment, so a
        # tensor with more or fewer bytes than its shape and type need shows as a gap or overlap.
        align = int(self.reader.alignment)
        end, a = int(self.reader.data_offset), None
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
    def _field(self, key: str) -> Any:
        return self.reader.fields.get(key)

    def has(self, key: str) -> bool:
        return key in self.reader.fields

    def _get(self, key: str, kinds: Iterable[str], what: str, default: Any) -> Any:
        f = self._field(key)
        if f is None:
            if default is _REQUIRED:
                raise self.error(f"metadata key {key} is missing")
            return default
        names = [t.name for t in f.types]
        if not names or names[0] not in kinds:
            raise self.error(
                f"metadata {key} should be {what}, found {'/'.join(names) or 'nothing'}"
            )
        return f.contents()

    def get_int(self, key: str, default: Any = None) -> int:
        v = self._get(key, _INT_TYPES, "an integer", _REQUIRED if default is None else default)
        return int(v)

    def get_float(self, key: str, default: Any = None) -> float:
        kinds = _INT_TYPES + ("FLOAT32", "FLOAT64")
        return float(self._get(key, kinds, "a number", _REQUIRED if default is None else default))

    def get_str(self, key: str, default: Any = None) -> str:
        return str(
            self._get(key, ("STRING",), "a string", _REQUIRED if default is None else default)
        )

    def get_bool(self, key: str, default: Any = None) -> bool:
        return bool(
            self._get(key, ("BOOL",), "a boolean", _REQUIRED if default is None else default)
        )

    def metadata(self) -> dict[str, Any]:
        """Every key with a short rendering of its value (arrays abbreviated)."""
        out: dict[str, Any] = {}
        for key, f in self.reader.fields.items():
            if key.startswith("GGUF."):
                continue
            if f.types and f.types[0].name == "ARRAY":
                out[key] = f"[{len(f.data)} items]"
            else:
                out[key] = f.contents()
        return out

    # -- the model -------------------------------------------------------------------------------
    def _config(self) -> ModelConfig:
        a = self.arch
        n_embd = self.get_int(f"{a}.embedding_length")
        n_head = self.get_int(f"{a}.attention.head_count")
        head_dim = self.get_int(f"{a}.attention.key_length", n_embd // max(n_head, 1))
        if self.get_int(f"{a}.attention.value_length", head_dim) != head_dim:
            raise self.error("attention.value_length differs from key_length; not supported")
        n_rot = self.get_int(f"{a}.rope.dimension_count", head_dim)
        if n_rot != head_dim:
            raise self.error(f"rope.dimension_count {n_rot} != head dim {head_dim}; not supported")
        if "token_embd.weight" not in self.tensors:
            raise self.error("tensor token_embd.weight is missing")
        if len(self.tensors["token_embd.weight"].shape) != 2:
            shape = self.tensors["token_embd.weight"].shape
            raise self.error(f"tensor token_embd.weight has shape {shape}, not (n_vocab, n_embd)")
        n_vocab = self.tensors["token_embd.weight"].shape[0]
        common: dict[str, Any] = dict(
            arch=a,
            n_vocab=n_vocab,
            n_embd=n_embd,
            n_layer=self.get_int(f"{a}.block_count"),
            n_head=n_head,
            n_head_kv=self.get_int(f"{a}.attention.head_count_kv", n_head),
            head_dim=head_dim,
            n_ff=self.get_int(f"{a}.feed_forward_length"),
            rms_eps=self.get_float(f"{a}.attention.layer_norm_rms_epsilon", 1e-6),
            rope_base=self.get_float(f"{a}.rope.freq_base", 10000.0),
            tied_embeddings="output.weight" not in self.tensors,
            name=self.get_str("general.name", self.path.stem),
        )
        for field, key in _SIZES.items():
            if common[field] < 1:
                raise self.error(f"metadata {a}.{key} is {common[field]}; it must be positive")
        if common["n_layer"] > len(self.tensors):  # each layer has several tensors
            raise self.error(
                f"metadata {a}.block_count is {common['n_layer']}, "
                f"but the file holds only {len(self.tensors)} tensors"
            )
        factor = self.get_float(f"{a}.rope.scaling.factor", 1.0) or 1.0
        if self.get_str(f"{a}.rope.scaling.type", "linear") == "linear":
            common["rope_freq_scale"] = 1.0 / factor
        if a == "gemma3":
            # As llama.cpp: local layers use base 1e4, every 6th layer is global, and the
            # attention scale is 1/sqrt(head_dim) (query_pre_attn_scalar = head_dim).
            common.update(
                rope_base_swa=10000.0,
                sliding_window=self.get_int(f"{a}.attention.sliding_window", 0),
                swa_pattern=6,
                attn_scale=head_dim**-0.5,
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

    def bytes_by_type(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.tensors.values():
            out[t.ggml_type] = out.get(t.ggml_type, 0) + t.n_bytes
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def tensor(self, name: str, dtype: DType | str = f32) -> np.ndarray:
        """Tensor ``name`` as a NumPy array of ``dtype`` (f32: memory-mapped where stored so)."""
        if name not in self.tensors:
            raise self.error(f"tensor {name} is missing")
        dt = dtype_of(dtype)
        info = self.tensors[name]
        raw = self._raw[name]
        if info.ggml_type in ("F32", "F16"):
            arr = np.asarray(raw.data).reshape(info.shape)
        else:
            arr = _gguf().quants.dequantize(raw.data, raw.tensor_type).reshape(info.shape)
        return arr if arr.dtype == dt.numpy else arr.astype(dt.numpy)

    def weights(
        self,
        dtype: DType | str | None = None,
        progress: Callable[[str, int, int], None] | None = None,
    ) -> dict[str, np.ndarray]:
        """Every weight the graph needs: matrices in ``dtype`` (default f32), norms in f32."""
        mat = dtype_of(dtype) if dtype is not None else f32
        shapes = weight_shapes(self.config)
        names = [n for n in shapes if n in self.tensors]
        out: dict[str, np.ndarray] = {}
        for i, name in enumerate(names):
            out[name] = self.tensor(name, mat if len(shapes[name]) == 2 else f32)
            if progress is not None:
                progress(name, i + 1, len(names))
        return tie_output(self.config, out)

    def describe(self) -> str:
        c = self.config
        lines = [
            f"file:        {self.path}",
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
        for kind, n in self.bytes_by_type().items():
            count = sum(t.ggml_type == kind for t in self.tensors.values())
            lines.append(f"  {kind:<6} {count:>4} tensors  {n / 2**20:9.2f} MiB")
        return "\n".join(lines)


_REQUIRED = object()
_SIZES = {  # ModelConfig field -> the metadata key it comes from (after "{arch}.")
    "n_embd": "embedding_length",
    "n_layer": "block_count",
    "n_head": "attention.head_count",
    "n_head_kv": "attention.head_count_kv",
    "head_dim": "attention.key_length",
    "n_ff": "feed_forward_length",
}
_INT_TYPES = ("UINT8", "INT8", "UINT16", "INT16", "UINT32", "INT32", "UINT64", "INT64")


def open_gguf(path: str | Path) -> GGUFModel:
    """Open and check a GGUF model file (see ``GGUFModel``)."""
    return GGUFModel(path)

"""What every decoder-only builder shares: inputs, KV caches, the attention block, the head.

A forward graph processes ``n_tokens`` tokens (a prompt chunk, or 1 for decode) against
per-layer KV caches that are STATE tensors, so the same graph object runs every decode step.

Inputs (all i32):
    tokens (n,)            token ids
    pos (n,)               their positions
    kv_idx.<kind> (n,)     cache row each token's K/V is written to, per attention kind
    kv_pos.<kind> (m,)     position held by each of the first m cache rows after the write
                           (-1: empty), which the attention turns into its causal/window mask
where ``kind`` is ``full`` (rows = positions, ``n_ctx`` of them) or ``swa`` (a ring of rows,
enough for the window plus a chunk). Who fills these is the session's business
(``engine.model.session``); the graph only reads them.

Logits: ``"last"`` (the default) computes the head for the last token only; ``"all"`` for every
token; a tuple of row indices for those rows; ``"none"`` skips the head entirely (the layers'
KV writes still happen); ``"argmax"`` computes the last token's logits and outputs only their
argmax (1,) i32, so greedy decoding copies one id back instead of the vocabulary's logits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from graph.builder import GraphBuilder, Tensor
from graph.dtypes import DType, f32, i32
from graph.ir import Graph, contiguous_strides
from graph.models.config import FULL, STACKED, SWA, ModelConfig, weight_layers, weight_shapes
from graph.ops import GraphError, RopeMode

__all__ = ["Forward", "Logits", "kv_slots"]

Logits = str | Sequence[int]


def kv_slots(cfg: ModelConfig, n_ctx: int, n_batch: int) -> dict[str, int]:
    """Cache rows per attention kind: the context for full layers; for sliding layers a ring
    that holds the window plus one chunk, so no key a chunk's queries need is overwritten."""
    slots = {}
    for kind in set(cfg.layer_kinds):
        if kind == FULL:
            slots[kind] = n_ctx
        else:
            slots[kind] = min(n_ctx, cfg.sliding_window + n_batch - 1)
    return slots


@dataclass
class Forward:
    """A forward graph under construction (used by the llama and gemma3 builders)."""

    cfg: ModelConfig
    n_tokens: int
    slots: dict[str, int]
    n_kv: dict[str, int]
    cache_dtype: DType = f32
    stack: bool = False  # stacked projections (config.STACKED): fewer, larger matrix products
    segment: tuple[int, int] | None = None  # layers [first, end) of a split model; see build

    def __post_init__(self) -> None:
        cfg, n = self.cfg, self.n_tokens
        if n < 1:
            raise GraphError(f"a forward pass needs at least one token, got n_tokens={n}")
        first, end = self.segment or (0, cfg.n_layer + 1)
        if not 0 <= first < end <= cfg.n_layer + 1:
            raise GraphError(
                f"segment {self.segment} must lie in 0..{cfg.n_layer + 1} (layers, then the head)"
            )
        self.first, self.end = first, end
        self.layer_ids = range(first, min(end, cfg.n_layer))
        self.g = g = GraphBuilder()
        self.shapes = weight_shapes(cfg, self.stack)
        self.part_shapes = weight_shapes(cfg) if self.stack else self.shapes  # unstacked names
        self.layers = weight_layers(cfg, self.stack)
        self._weights: dict[str, Tensor] = {}
        self.tokens = g.input("tokens", (n,), i32)
        self.pos = g.input("pos", (n,), i32)
        self.kv_idx: dict[str, Tensor] = {}
        self.kv_pos: dict[str, Tensor] = {}
        for kind in sorted(set(cfg.layer_kinds)):
            if kind not in self.slots:
                raise GraphError(f"no cache size given for {kind} attention layers")
            m = self.n_kv.get(kind, self.slots[kind])
            if not 0 < m <= self.slots[kind]:
                raise GraphError(
                    f"n_kv for {kind} layers is {m}; it must be in 1..{self.slots[kind]}"
                )
            self.n_kv[kind] = m
            self.kv_idx[kind] = g.input(f"kv_idx.{kind}", (n,), i32)
            self.kv_pos[kind] = g.input(f"kv_pos.{kind}", (m,), i32)

    def w(self, name: str) -> Tensor:
        """The weight ``name`` (created on first use, with its GGUF shape and layer tag)."""
        if name not in self._weights:
            shape = self.shapes[name]
            dtype = self.cfg.weight_dtype(name)  # norms stay f32, as in GGUF files
            self._weights[name] = self.g.weight(name, shape, dtype, layer=self.layers[name])
        return self._weights[name]

    def attention(
        self,
        il: int,
        x: Tensor,
        *,
        rope_mode: RopeMode,
        rope_base: float,
        freq_scale: float = 1.0,
        qk_norm: bool = False,
    ) -> Tensor:
        """Q/K/V projections, optional per-head norms, rope, cache write, attention, output proj."""
        cfg, g, n, p = self.cfg, self.g, self.n_tokens, f"blk.{il}."
        kind = cfg.layer_kinds[il]
        heads = [(h, cfg.head_dim) for h in (cfg.n_head, cfg.n_head_kv, cfg.n_head_kv)]
        q, k, v = self.project(p, "attn_qkv", x, heads)
        if qk_norm:
            q = g.rms_norm(q, self.w(p + "attn_q_norm.weight"), cfg.rms_eps)
            k = g.rms_norm(k, self.w(p + "attn_k_norm.weight"), cfg.rms_eps)
        q = g.rope(
            q, self.pos, base=rope_base, mode=rope_mode, freq_scale=freq_scale, name=f"q.{il}"
        )
        k = g.rope(
            k, self.pos, base=rope_base, mode=rope_mode, freq_scale=freq_scale, name=f"k.{il}"
        )
        shape = (self.slots[kind], cfg.n_head_kv, cfg.head_dim)
        k_cache = g.state(f"cache_k.{il}", shape, self.cache_dtype)
        v_cache = g.state(f"cache_v.{il}", shape, self.cache_dtype)
        k_all = g.set_rows(k_cache, k, self.kv_idx[kind], name=f"k_write.{il}")
        v_all = g.set_rows(v_cache, v, self.kv_idx[kind], name=f"v_write.{il}")
        m = self.n_kv[kind]
        if m < self.slots[kind]:
            k_all, v_all = g.rows(k_all, 0, m), g.rows(v_all, 0, m)
        window = cfg.sliding_window if kind == SWA else 0
        a = g.attention(
            q,
            k_all,
            v_all,
            self.pos,
            self.kv_pos[kind],
            scale=cfg.scale,
            window=window,
            prefix_rows=True,  # the session fills rows in position order (engine.model.session)
            name=f"attn.{il}",
        )
        a = g.reshape(a, (n, cfg.n_head * cfg.head_dim))
        return g.mul_mat(self.w(p + "attn_output.weight"), a, name=f"attn_out.{il}")

    def project(
        self,
        prefix: str,
        stacked: str,
        x: Tensor,
        split: list[tuple[int, ...]] | None = None,
    ) -> list[Tensor]:
        """The projections of ``STACKED[stacked]`` applied to ``x``: each (n, rows_i), or
        (n, *split[i]) when ``split`` gives the trailing dims (e.g. heads, head_dim).

        Separate: one matrix product each. Stacked: one product with the stacked matrix, then a
        view per part (rows of the result strided by the stack's width, no copy).
        """
        g, n = self.g, self.n_tokens
        names = [f"{prefix}{m}.weight" for m in STACKED[stacked]]
        rows = [self.part_shapes[name][0] for name in names]
        dims = split or [(r,) for r in rows]
        if f"{prefix}{stacked}.weight" not in self.shapes:  # not stacked (in this layer)
            return [
                g.reshape(g.mul_mat(self.w(nm), x), (n, *d))
                for nm, d in zip(names, dims, strict=True)
            ]
        y = g.mul_mat(self.w(f"{prefix}{stacked}.weight"), x, name=f"{prefix}{stacked}")
        width = y.shape[-1]
        out, start = [], 0
        for r, d in zip(rows, dims, strict=True):
            inner = contiguous_strides(d)
            out.append(g.view(y, (n, *d), (width, *inner), start))
            start += r
        return out

    def start(self, embed: Callable[[], Tensor]) -> Tensor:
        """The hidden states the segment starts from: ``embed()`` for the first one, else the
        previous segment's, fed as the input ``hidden`` (n, n_embd) f32."""
        if self.first == 0:
            return embed()
        return self.g.input("hidden", (self.n_tokens, self.cfg.n_embd), f32)

    def head(self, h: Tensor, logits: Logits) -> Graph:
        """Final norm and output matrix on the requested rows only; returns the finished graph.
        A segment that ends before the head outputs its hidden states instead."""
        g, n = self.g, self.n_tokens
        if self.end <= self.cfg.n_layer:
            return self._finish([g.cont(h, name="hidden_out")])
        if logits == "none":
            return self._finish([])
        if logits in ("last", "argmax"):
            h = g.rows(h, n - 1, n)
        elif logits != "all":
            rows = [int(r) for r in logits]  # type: ignore[union-attr]
            if not rows or any(not 0 <= r < n for r in rows):
                raise GraphError(f"logits rows {rows} must be non-empty and within 0..{n - 1}")
            if rows == list(range(rows[0], rows[-1] + 1)):
                h = g.rows(h, rows[0], rows[-1] + 1)
            else:
                h = g.get_rows(h, g.constant("logits_rows", np.asarray(rows, np.int32)))
        h = g.rms_norm(h, self.w("output_norm.weight"), self.cfg.rms_eps, name="result_norm")
        out = g.mul_mat(self.w("output.weight"), h, name="logits")
        if logits == "argmax":
            out = g.argmax(out, name="next_token")
        return self._finish([out])

    def _finish(self, outputs: list[Tensor]) -> Graph:
        graph = self.g.build(outputs=outputs)
        graph.meta.update(
            {
                "model": self.cfg.name or self.cfg.arch,
                "arch": self.cfg.arch,
                "n_tokens": self.n_tokens,
                "n_kv": dict(self.n_kv),
                "slots": dict(self.slots),
            }
        )
        return graph

"""Llama-family decoder (Llama 2/3, Mistral shapes): pre-norm, rope, grouped-query attention,
SwiGLU feed-forward. Q/K weights are in GGUF's layout (rows permuted by the converter), so
rope pairs adjacent dims (``RopeMode.NORMAL``), as llama.cpp does.
"""

from __future__ import annotations

from graph.builder import Tensor
from graph.models.common import Forward
from graph.ops import RopeMode

__all__ = ["body"]


def body(f: Forward) -> Tensor:
    """The token embedding and the decoder layers; returns the final hidden states."""
    cfg, g = f.cfg, f.g
    h = f.start(lambda: g.get_rows(f.w("token_embd.weight"), f.tokens, name="inp_embd"))
    for il in f.layer_ids:
        p = f"blk.{il}."
        x = g.rms_norm(h, f.w(p + "attn_norm.weight"), cfg.rms_eps)
        a = f.attention(
            il,
            x,
            rope_mode=RopeMode.NORMAL,
            rope_base=cfg.rope_base,
            freq_scale=cfg.rope_freq_scale,
        )
        h = g.add(h, a, name=f"attn_res.{il}")
        x = g.rms_norm(h, f.w(p + "ffn_norm.weight"), cfg.rms_eps)
        gate, up = f.project(p, "ffn_gate_up", x)
        ff = g.mul_mat(f.w(p + "ffn_down.weight"), g.swiglu(gate, up), name=f"ffn_out.{il}")
        h = g.add(h, ff, name=f"l_out.{il}")
    return h

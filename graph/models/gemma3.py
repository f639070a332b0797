"""Gemma 3 decoder: embeddings scaled by sqrt(d), pre- and post-norms around attention and the
feed-forward, per-head RMS norms on Q and K, NeoX-layout rope with a local base on sliding
layers and a global base on full layers, GeGLU (tanh gelu). Norm weights are used as stored in
GGUF, where the converter already folded Gemma's ``1 + w`` into them.
"""

from __future__ import annotations

import math

from graph.builder import Tensor
from graph.models.common import Forward
from graph.models.config import SWA
from graph.ops import RopeMode

__all__ = ["body"]


def body(f: Forward) -> Tensor:
    """The token embedding and the decoder layers; returns the final hidden states."""
    cfg, g = f.cfg, f.g
    h = f.start(
        lambda: g.scale(
            g.get_rows(f.w("token_embd.weight"), f.tokens), math.sqrt(cfg.n_embd), name="inp_embd"
        )
    )
    for il in f.layer_ids:
        kind = cfg.layer_kinds[il]
        p = f"blk.{il}."
        local = kind == SWA
        x = g.rms_norm(h, f.w(p + "attn_norm.weight"), cfg.rms_eps)
        a = f.attention(
            il,
            x,
            rope_mode=RopeMode.NEOX,
            qk_norm=True,
            rope_base=cfg.rope_base_swa if local else cfg.rope_base,
            freq_scale=1.0 if local else cfg.rope_freq_scale,
        )
        w_post = f.w(p + "post_attention_norm.weight")
        h = g.rms_norm(a, w_post, cfg.rms_eps, name=f"attn_res.{il}", residual=h)
        x = g.rms_norm(h, f.w(p + "ffn_norm.weight"), cfg.rms_eps)
        gate, up = f.project(p, "ffn_gate_up", x)
        ff = g.mul_mat(f.w(p + "ffn_down.weight"), g.geglu(gate, up))
        w_post = f.w(p + "post_ffw_norm.weight")
        h = g.rms_norm(ff, w_post, cfg.rms_eps, name=f"l_out.{il}", residual=h)
    return h

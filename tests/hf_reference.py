"""Tiny Hugging Face transformers models (torch, CPU, f32) and their weights renamed to GGUF.

The renaming follows llama.cpp's converter: Llama's Q/K rows are permuted so that rope pairs
adjacent dims, and Gemma's RMSNorm weights get ``+1`` folded in (HF computes ``x * (1 + w)``).
"""

from __future__ import annotations

import numpy as np

from graph.models import ModelConfig

torch = __import__("pytest").importorskip("torch")
transformers = __import__("pytest").importorskip("transformers")


def _permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF (rotate-half) rows -> GGUF (interleaved pairs) rows, as convert_hf_to_gguf does."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def hf_model(cfg: ModelConfig, seed: int = 0):
    """A randomly initialised HF model with ``cfg``'s shape, in eval mode, f32, eager attention."""
    torch.manual_seed(seed)
    common = dict(
        vocab_size=cfg.n_vocab,
        hidden_size=cfg.n_embd,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_head_kv,
        head_dim=cfg.head_dim,
        intermediate_size=cfg.n_ff,
        rms_norm_eps=cfg.rms_eps,
        max_position_embeddings=4096,
        attn_implementation="eager",
        torch_dtype=torch.float32,
    )
    if cfg.arch == "llama":
        conf = transformers.LlamaConfig(
            **common, rope_theta=cfg.rope_base, tie_word_embeddings=False
        )
        model = transformers.LlamaForCausalLM(conf)
    else:
        kinds = ["full_attention" if k == "full" else "sliding_attention" for k in cfg.layer_kinds]
        conf = transformers.Gemma3TextConfig(
            **common,
            sliding_window=cfg.sliding_window,
            layer_types=kinds,
            query_pre_attn_scalar=round(cfg.scale**-2),
            hidden_activation="gelu_pytorch_tanh",
            rope_parameters={
                "full_attention": {"rope_type": "default", "rope_theta": cfg.rope_base},
                "sliding_attention": {"rope_type": "default", "rope_theta": cfg.rope_base_swa},
            },
            tie_word_embeddings=True,
            final_logit_softcapping=None,
            attn_logit_softcapping=None,
        )
        model = transformers.Gemma3ForCausalLM(conf)
        with torch.no_grad():  # HF inits norm weights at 0 (= scale 1); make them matter
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.normal_(0.0, 0.1)
    return model.eval()


def gguf_weights(model, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """The model's parameters under GGUF names, in GGUF layout."""
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    gemma = cfg.arch == "gemma3"

    def norm(k: str) -> np.ndarray:
        return sd[k] + 1.0 if gemma else sd[k]

    out = {
        "token_embd.weight": sd["model.embed_tokens.weight"],
        "output_norm.weight": norm("model.norm.weight"),
    }
    out["output.weight"] = sd.get("lm_head.weight", sd["model.embed_tokens.weight"])
    for i in range(cfg.n_layer):
        h, p = f"model.layers.{i}.", f"blk.{i}."
        q, k = sd[h + "self_attn.q_proj.weight"], sd[h + "self_attn.k_proj.weight"]
        if not gemma:
            q, k = _permute_qk(q, cfg.n_head), _permute_qk(k, cfg.n_head_kv)
        out |= {
            p + "attn_q.weight": q,
            p + "attn_k.weight": k,
            p + "attn_v.weight": sd[h + "self_attn.v_proj.weight"],
            p + "attn_output.weight": sd[h + "self_attn.o_proj.weight"],
            p + "ffn_gate.weight": sd[h + "mlp.gate_proj.weight"],
            p + "ffn_up.weight": sd[h + "mlp.up_proj.weight"],
            p + "ffn_down.weight": sd[h + "mlp.down_proj.weight"],
            p + "attn_norm.weight": norm(h + "input_layernorm.weight"),
        }
        if gemma:
            out |= {
                p + "attn_q_norm.weight": norm(h + "self_attn.q_norm.weight"),
                p + "attn_k_norm.weight": norm(h + "self_attn.k_norm.weight"),
                p + "post_attention_norm.weight": norm(h + "post_attention_layernorm.weight"),
                p + "ffn_norm.weight": norm(h + "pre_feedforward_layernorm.weight"),
                p + "post_ffw_norm.weight": norm(h + "post_feedforward_layernorm.weight"),
            }
        else:
            out[p + "ffn_norm.weight"] = norm(h + "post_attention_layernorm.weight")
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def hf_logits(model, ids: list[int]) -> np.ndarray:
    """Logits (len(ids), vocab) of a full forward pass over ``ids``."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()

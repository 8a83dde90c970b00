"""Tiny random models of every architecture in the table, built from configs (no downloads)."""

from __future__ import annotations

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

VOCAB = 96
SPECS: dict[str, dict] = {
    "gpt2": dict(n_layer=2, n_embd=32, n_head=4, n_positions=64),
    "gpt_neox": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64),
    "bloom": dict(n_layer=2, hidden_size=32, n_head=4),
    "falcon": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, new_decoder_architecture=True, num_kv_heads=2),
    "falcon-mq": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, new_decoder_architecture=False, multi_query=True),
    "falcon-mha": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, new_decoder_architecture=False, multi_query=False),
    "phi": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64),
    "phi3": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, pad_token_id=0),
    "gpt_bigcode": dict(n_layer=2, n_embd=32, n_head=4, multi_query=True),
    "gpt_bigcode-mha": dict(n_layer=2, n_embd=32, n_head=4, multi_query=False),
    "mpt": dict(n_layers=2, d_model=32, n_heads=4),
    "opt": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, ffn_dim=64, word_embed_proj_dim=32),
    "llama": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64),
    "mistral": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64),
    "qwen2": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64),
    "gemma": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=1, intermediate_size=64, head_dim=8),
    "mixtral": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2),
    "qwen3": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, head_dim=8),
    "gemma2": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, head_dim=8),
    "olmo": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64),
    "olmo2": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64),
    "stablelm": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64),
    "qwen2_moe": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=4, num_experts_per_tok=2),
    "gptj": dict(n_layer=2, n_embd=32, n_head=4, rotary_dim=4),
    "bert": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64),
    "t5": dict(num_layers=2, num_decoder_layers=2, d_model=32, num_heads=4, d_kv=8, d_ff=64),
}
ARCHS = sorted(SPECS)


def build(name: str, *, seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny model of architecture ``name`` (a key of :data:`SPECS`), eager attention, fp32."""
    torch.manual_seed(seed)
    model_type = name.split("-")[0]
    kw = {"vocab_size": VOCAB, **SPECS[name], **overrides}
    for tok in ("bos_token_id", "eos_token_id"):
        kw.setdefault(tok, 1)
    cfg = AutoConfig.for_model(model_type, **kw)
    cfg._attn_implementation = "eager"
    if model_type == "t5":
        return transformers.T5ForConditionalGeneration(cfg).eval()
    if model_type == "bert":
        return transformers.BertModel(cfg).eval()
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()


def forward(model: torch.nn.Module, input_ids: torch.Tensor, **kw):
    """Run any tiny model on ``input_ids`` (T5 gets the same ids as decoder input)."""
    if getattr(model.config, "model_type", "") == "t5":
        return model(input_ids=input_ids, decoder_input_ids=input_ids, **kw)
    return model(input_ids=input_ids, **kw)


def toy_loss(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """A loss that reaches every parameter: next-token CE for LMs, a feature loss otherwise."""
    out = forward(model, input_ids)
    if hasattr(out, "logits"):
        logits = out.logits[:, :-1].reshape(-1, out.logits.shape[-1])
        return torch.nn.functional.cross_entropy(logits, input_ids[:, 1:].reshape(-1))
    return out.last_hidden_state.pow(2).mean() + out.last_hidden_state.mean()

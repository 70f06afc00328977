"""Hugging Face transformers integration: `register()` adds selfattn as an
attention implementation, so `attn_implementation="selfattn"` runs a model's
attention on the fused kernel.

    from selfattn.integrations.transformers import register
    register()
    model = AutoModelForCausalLM.from_config(config, attn_implementation="selfattn")

The attention function follows transformers' `sdpa_attention_forward`
contract: query (B, Hq, Sq, D), key/value (B, Hkv, Sk, D) in, output
(B, Sq, Hq, Dv) and no weights out. It reads them as (B, S, H, D) views (no
copies), keeps grouped-query heads native (no repeat_kv), turns
`is_causal` without a mask into the kernel's causal flag (top-left, as SDPA),
and takes the masks transformers builds for SDPA (registered as well): bool
True = attend, or float added. Score modifiers run in the kernel: the
`softcap` a model passes (Gemma 2's attn_logit_softcapping) and ALiBi slopes
passed as `alibi_slopes` ((Hq,) or (B, Hq) float32; bottom-right offset, so
that the last query is the last key's position, as in a KV cache).
Attention sinks (`s_aux`) are refused.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..errors import ArgumentError
from ..functional import attention

NAME = "selfattn"

__all__ = ["NAME", "register", "selfattn_attention_forward"]


def selfattn_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                               value: torch.Tensor, attention_mask: Optional[torch.Tensor],
                               dropout: float = 0.0, scaling: Optional[float] = None,
                               is_causal: Optional[bool] = None,
                               position_bias: Optional[torch.Tensor] = None,
                               softcap: Optional[float] = None,
                               alibi_slopes: Optional[torch.Tensor] = None,
                               **kwargs) -> Tuple[torch.Tensor, None]:
    """transformers attention function: query (B, Hq, Sq, D), key (B, Hkv, Sk, D),
    value (B, Hkv, Sk, Dv), attention_mask bool/float broadcastable to
    (B, Hq, Sq, Sk) or None -> ((B, Sq, Hq, Dv), None)."""
    if kwargs.get("s_aux") is not None:
        raise ArgumentError("selfattn attention does not support attention sinks (s_aux); use "
                            "attn_implementation='eager' for models that need them")
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    q_len = query.shape[2]
    causal = bool(q_len > 1 and attention_mask is None and is_causal)
    if causal and key.shape[2] > q_len:
        # Top-left causal queries never see keys beyond q_len (SDPA crops them too, for the
        # prefill of an empty static cache); cropping makes both alignments agree.
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    if position_bias is not None:
        from transformers.integrations.sdpa_attention import create_position_bias_mask

        attention_mask = create_position_bias_mask(position_bias, attention_mask, causal, query, key)
        causal = False
    out = attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                    causal=causal,
                    causal_alignment="bottom_right" if alibi_slopes is not None else "top_left",
                    scale=scaling, attn_mask=attention_mask, dropout_p=dropout,
                    alibi_slopes=alibi_slopes, softcap=softcap or 0.0)
    return out, None


def register(name: str = NAME) -> None:
    """Registers the attention function and SDPA's mask builder under `name`
    with transformers' AttentionInterface and AttentionMaskInterface."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError as e:
        raise ImportError("selfattn.integrations.transformers.register needs transformers "
                          "(pip install transformers)") from e
    AttentionInterface.register(name, selfattn_attention_forward)
    AttentionMaskInterface.register(name, sdpa_mask)

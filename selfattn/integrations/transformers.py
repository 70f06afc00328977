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
Attention sinks (`s_aux`) are refused. Padding-free packed batches (several
sequences in one row: the flash-attention kwargs cu_seq_lens_q/k of
DataCollatorWithFlattening, or restarting position_ids for which transformers
built its packed block-diagonal mask) run the packed varlen kernels: each
sequence attends to itself only, and no work goes to the masked blocks.

Generation: `make_cache(config, max_cache_len)` is a transformers Cache
(pass it as `past_key_values`, or `cache` in recent transformers) whose
layers preallocate their keys and values in selfattn's (B, S, H, D) layout,
write each step's new tokens in place and hand the attention views of the
valid prefix: no step copies the cache (transformers' default DynamicCache
concatenates, copying it whole). Sliding-window layers keep the whole
sequence as well; the mask transformers builds for them applies the window.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch

from ..errors import ArgumentError
from ..functional import attention
from ..varlen import varlen_attention

NAME = "selfattn"

__all__ = ["NAME", "make_cache", "register", "selfattn_attention_forward"]


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
    packed = _packed_offsets(query, key, attention_mask, is_causal, kwargs)
    if packed is not None and alibi_slopes is None and position_bias is None:
        # padding-free packed batch: the sequences' own attention, no T x T mask
        cu_q, cu_k = packed
        lengths_q, lengths_k = cu_q.diff(), cu_k.diff()
        out = varlen_attention(query[0].transpose(0, 1), key[0].transpose(0, 1),
                               value[0].transpose(0, 1), cu_q, cu_k, int(lengths_q.max()),
                               int(lengths_k.max()), scale=scaling,
                               window_size=(-1, 0) if is_causal else (-1, -1),
                               enable_gqa=True, dropout_p=dropout)
        return out.unsqueeze(0), None
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


def _packed_offsets(query: torch.Tensor, key: torch.Tensor,
                    attention_mask: Optional[torch.Tensor], is_causal: bool,
                    kwargs) -> Optional[tuple]:
    """(cu_seq_q, cu_seq_k) when the batch is several sequences packed into one
    row: transformers' flash-attention kwargs (cu_seq_lens_q / cu_seq_lens_k,
    from DataCollatorWithFlattening), or restarting position_ids of a batch of
    one for which transformers built the packed block-diagonal mask (it does
    so in training setups: no 2-D mask, no cache); the mask is checked to be
    exactly that, so the packed kernels compute what it would. None otherwise."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None and cu_k is not None:
        return cu_q, cu_k
    position_ids = kwargs.get("position_ids")
    T = query.shape[2]
    if (position_ids is None or query.shape[0] != 1 or key.shape[2] != T
            or position_ids.numel() != T or attention_mask is None
            or attention_mask.dtype != torch.bool or attention_mask.numel() != T * T):
        return None
    flat = position_ids.reshape(-1)
    new = flat.diff() != 1
    if not bool(new.any()):
        return None
    segment = torch.cat([new.new_zeros(1), new]).cumsum(0)
    block = segment[:, None] == segment[None, :]
    if is_causal:
        block = block.tril()
    if not torch.equal(attention_mask.reshape(T, T), block):
        return None
    starts = new.nonzero().flatten() + 1
    cu = torch.cat([starts.new_zeros(1), starts, starts.new_full((1,), T)]).to(torch.int64)
    return cu, cu


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


@functools.lru_cache(maxsize=None)
def _cache_layer_class():
    from transformers.cache_utils import CacheLayerMixin

    class SelfattnCacheLayer(CacheLayerMixin):
        """One attention layer's cache: (B, max_cache_len, H, D) buffers,
        written in place; keys/values are (B, H, length, D) views of them."""

        is_compileable = False
        is_croppable = False
        is_sliding = False

        def __init__(self, max_cache_len: int):
            super().__init__()
            self.max_cache_len = max_cache_len
            self.length = 0

        def lazy_initialization(self, key_states, value_states):
            B, H, _, D = key_states.shape
            self.device = key_states.device
            self._k = key_states.new_zeros(B, self.max_cache_len, H, D)
            self._v = value_states.new_zeros(B, self.max_cache_len, H, value_states.shape[-1])
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            end = self.length + key_states.shape[-2]
            if end > self.max_cache_len:
                raise ArgumentError(f"selfattn cache: {end} tokens do not fit max_cache_len = "
                                    f"{self.max_cache_len}")
            self._k[:, self.length:end] = key_states.transpose(1, 2)
            self._v[:, self.length:end] = value_states.transpose(1, 2)
            self.length = end
            self.keys = self._k[:, :end].transpose(1, 2)
            self.values = self._v[:, :end].transpose(1, 2)
            return self.keys, self.values

        def get_mask_sizes(self, query_length: int):
            return self.length + query_length, 0

        def get_seq_length(self) -> int:
            return self.length

        def get_max_length(self) -> int:
            return self.max_cache_len

        def reset(self) -> None:
            self.length = 0
            self.keys = self.values = None

        def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
            if self.is_initialized:
                beam_idx = beam_idx.to(self.device)
                self._k.copy_(self._k.index_select(0, beam_idx))
                self._v.copy_(self._v.index_select(0, beam_idx))
                self.keys = self._k[:, :self.length].transpose(1, 2)
                self.values = self._v[:, :self.length].transpose(1, 2)

    return SelfattnCacheLayer


def make_cache(config, max_cache_len: int):
    """A transformers Cache for generation with selfattn: one preallocated
    layer per attention layer of `config` (prompt plus new tokens must fit
    max_cache_len), written in place, no copy of the cache per step.
    Sliding-window layers (Mistral, Gemma 2/3) keep the whole sequence too,
    and see their window through the mask transformers builds for them (more
    memory than transformers' own sliding caches, which keep the window
    only); other layer types (chunked, linear attention) are refused."""
    from transformers.cache_utils import Cache

    text = config.get_text_config(decoder=True)
    kinds = set(getattr(text, "layer_types", None) or ["full_attention"])
    if not kinds <= {"full_attention", "sliding_attention"}:
        raise ArgumentError(f"selfattn make_cache: only full and sliding-window attention layers "
                            f"are supported, the model has {sorted(kinds)}")
    if isinstance(max_cache_len, bool) or not isinstance(max_cache_len, int) or max_cache_len < 1:
        raise ArgumentError(f"selfattn make_cache: max_cache_len must be an int >= 1, got "
                            f"{max_cache_len!r}")
    layer = _cache_layer_class()
    return Cache(layers=[layer(max_cache_len) for _ in range(text.num_hidden_layers)])

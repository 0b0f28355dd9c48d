"""The Loftey decoder: GQA attention without positions, RMSNorm, SwiGLU experts.

Dimension letters: B batch, T new tokens, S keys (cached plus new), H query heads,
K kv heads, D head dim, C hidden, V vocab.

The model has no positional encoding at all, so token order reaches it only through the
causal mask. Left padding therefore needs nothing but the attention mask: padded keys are
hidden from every query, and a real token's logits equal those of the unpadded prompt.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from loftey.model.configuration import LofteyConfig
from loftey.model.moe import LofteyExpert, LofteyMoE

logger = logging.getLogger(__name__)


class LofteyRMSNorm(nn.Module):
    """weight * x / sqrt(mean(x^2) + eps), computed in float32."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)


def build_attention_mask(
    padding_mask: torch.Tensor | None, batch_size: int, num_new: int, num_cached: int, device: torch.device
) -> torch.Tensor | None:
    """Build the boolean mask [B or 1, 1, T, S] of keys each new token may attend to (True).

    Key j is visible to the query at position i when j <= i and `padding_mask[b, j]` is 1.
    Every query also attends to its own key, because a padded query at the left edge would
    otherwise have no visible key and its softmax would be NaN. Real queries always see their own key, so
    this changes no real token's output.

    Args:
        padding_mask: [B, S] with 1 for real tokens and 0 for padding, or None for no padding.
        num_new: T, the tokens in this forward call.
        num_cached: tokens already in the KV cache; S = num_cached + T.

    Returns:
        None when every new token may see every key (one new token, no padding).
    """
    num_keys = num_cached + num_new
    if padding_mask is not None and padding_mask.ndim == 2 and bool(padding_mask.all()):
        padding_mask = None  # no padding: a plain causal mask, or none at all for one new token
    if padding_mask is None and num_new == 1:
        return None
    key_pos = torch.arange(num_keys, device=device)  # [S]
    query_pos = torch.arange(num_cached, num_keys, device=device)  # [T]
    causal = key_pos[None, :] <= query_pos[:, None]  # [T, S]
    if padding_mask is None:
        return causal[None, None]  # [1, 1, T, S]
    if padding_mask.shape != (batch_size, num_keys):
        raise ValueError(
            f"attention_mask must have shape [batch, cached + new tokens] = [{batch_size}, {num_keys}], "
            f"got {list(padding_mask.shape)}"
        )
    visible = causal[None] & padding_mask.bool()[:, None, :]  # [B, T, S]
    visible |= (key_pos[None, :] == query_pos[:, None])[None]  # [B, T, S], each query attends to itself
    return visible[:, None]  # [B, 1, T, S]


class LofteyAttention(nn.Module):
    """Causal grouped-query attention: query head h reads kv head h // (H / K); no biases."""

    def __init__(self, config: LofteyConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, cache: Cache | None) -> torch.Tensor:
        batch_size, num_new, _ = x.shape
        q = self.q_proj(x).view(batch_size, num_new, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, T, D]
        k = self.k_proj(x).view(batch_size, num_new, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, K, T, D]
        v = self.v_proj(x).view(batch_size, num_new, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, K, T, D]
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # [B, K, S, D] each

        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=self.num_heads != self.num_kv_heads
        )  # [B, H, T, D]
        out = out.transpose(1, 2).reshape(batch_size, num_new, self.num_heads * self.head_dim)  # [B, T, H*D]
        return self.o_proj(out)


class LofteyDecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, config: LofteyConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = LofteyRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LofteyAttention(config, layer_idx)
        self.post_attention_layernorm = LofteyRMSNorm(config.hidden_size, config.rms_norm_eps)
        if config.use_moe:
            self.mlp = LofteyMoE(
                config.hidden_size, config.intermediate_size, config.expert_num, config.topk, bias=config.mlp_bias
            )
        else:
            self.mlp = LofteyExpert(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, cache: Cache | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LofteyPreTrainedModel(PreTrainedModel):
    config_class = LofteyConfig
    config: LofteyConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["LofteyDecoderLayer"]
    _supports_sdpa = True
    # Only growing caches: the mask is built for [cached + new] keys, which a static cache
    # of fixed length does not match.
    _can_compile_fullgraph = False

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, LofteyRMSNorm):
            nn.init.ones_(module.weight)


class LofteyModel(LofteyPreTrainedModel):
    """Embedding, decoder layers and final norm; returns the last hidden states."""

    def __init__(self, config: LofteyConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LofteyDecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = LofteyRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """Run the decoder over new tokens, reading and extending `cache` when given.

        `attention_mask` is [B, cached + new] with 0 at padding; a 4D boolean or additive
        mask [B, 1, T, S] is used as it is. Position ids are accepted and ignored because the
        model has no positional encoding.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)  # [B, T, C]
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if cache is not None and getattr(cache, "is_compileable", False):
            raise ValueError(f"{type(cache).__name__} is not supported; use DynamicCache (the default)")

        batch_size, num_new, _ = inputs_embeds.shape
        num_cached = cache.get_seq_length() if cache is not None else 0
        if attention_mask is not None and attention_mask.ndim == 4:
            mask = attention_mask
        else:
            mask = build_attention_mask(attention_mask, batch_size, num_new, num_cached, inputs_embeds.device)

        hidden = inputs_embeds
        for layer in self.layers:
            hidden = layer(hidden, mask, cache)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden), cache=cache if use_cache else None)


class LofteyForCausalLM(LofteyPreTrainedModel, GenerationMixin):
    """Loftey decoder with its untied lm_head; `generate` comes from transformers.

    `from_pretrained(folder, dtype=...)` loads the published layout strictly from
    safetensors; see `loftey.model.loading.load_pretrained`.
    """

    def __init__(self, config: LofteyConfig):
        super().__init__(config)
        self.model = LofteyModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs) -> LofteyForCausalLM:
        """Load a checkpoint folder strictly from safetensors; see `load_pretrained`."""
        from loftey.model.loading import load_pretrained

        if model_args:
            raise TypeError(f"from_pretrained takes no positional arguments after the folder, got {model_args!r}")
        return load_pretrained(cls, pretrained_model_name_or_path, **kwargs)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Return logits [B, T, V] (the last `logits_to_keep` positions when it is > 0).

        `labels` [B, T] give the mean next-token cross-entropy as `loss`; -100 is ignored.
        """
        # transformers before 5.x passes the cache as past_key_values.
        cache = cache if cache is not None else kwargs.pop("past_key_values", None)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
        )
        hidden = outputs.last_hidden_state  # [B, T, C]
        if logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]  # [B, logits_to_keep, C]
        logits = self.lm_head(hidden)  # [B, T, V]

        loss = None
        if labels is not None:
            shifted = logits[:, :-1].reshape(-1, logits.shape[-1]).float()  # [B*(T-1), V]
            loss = F.cross_entropy(shifted, labels[:, 1:].reshape(-1), ignore_index=-100)  # labels [B*(T-1)]
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=outputs.cache)

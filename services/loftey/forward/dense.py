"""The forward pass of one step over a ragged batch, with the experts behind an ExpertExecutor.

Dimension letters: B rows (sequences), N tokens of the step (all rows'
tokens packed), T the longest row's tokens, S keys, H heads, K kv heads,
D head dim, C hidden, E experts, A active experts, V vocab.

Each row is one sequence with its own KV-cache slot: a new sequence brings
its whole prompt (start 0), a continued one its last token (start = its
cached length). Token activations stay packed [N, C] so projections, routing
and experts never see padding; only attention pads the queries to [B, T].
A row reads keys only from its own slot, and only positions at or before
each query's own, so no row ever reads another's keys or stale positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loftey.forward.executor import ExpertExecutor
from loftey.forward.kv_cache import KVCache
from loftey.forward.weights import DenseWeights
from loftey.model.moe import route


@dataclass
class RaggedBatch:
    """Index tensors that place a step's packed tokens in rows, cache slots and positions."""

    token_ids: torch.Tensor  # [N] int64
    slots: torch.Tensor  # [B] cache slot of each row
    token_row: torch.Tensor  # [N] row of each token
    token_index: torch.Tensor  # [N] index of each token within its row
    token_slot: torch.Tensor  # [N] cache slot of each token
    token_pos: torch.Tensor  # [N] absolute position of each token in its sequence
    last_token: torch.Tensor  # [B] index in [0, N) of each row's last token
    max_tokens: int  # T, the max number of tokens in one row
    num_keys: int  # S, the longest sequence after this step
    mask: torch.Tensor  # [B, 1, T, S] bool, True where a query may read a key

    @classmethod
    def build(cls, rows: list[tuple[int, int, list[int]]]) -> RaggedBatch:
        """Build from rows of (slot, cached tokens before this step, token ids of this step)."""
        lengths = torch.tensor([len(tokens) for _, _, tokens in rows])  # [B]
        starts = torch.tensor([start for _, start, _ in rows])  # [B]
        slots = torch.tensor([slot for slot, _, _ in rows])  # [B]
        token_ids = torch.tensor([t for _, _, tokens in rows for t in tokens], dtype=torch.int64)  # [N]

        token_row = torch.repeat_interleave(torch.arange(len(rows)), lengths)  # [N]
        row_offsets = torch.cumsum(lengths, 0) - lengths  # [B], first token of each row
        token_index = torch.arange(token_ids.numel()) - row_offsets[token_row]  # [N]
        max_tokens = int(lengths.max())
        num_keys = int((starts + lengths).max())

        query = torch.arange(max_tokens)  # [T]
        key = torch.arange(num_keys)  # [S]
        query_pos = starts[:, None] + query[None, :]  # [B, T]
        visible = key[None, None, :] <= query_pos[:, :, None]  # [B, T, S], causal within the row's own slot
        real_query = query[None, :] < lengths[:, None]  # [B, T]
        # A padded query may read key 0 only, which keeps its softmax finite. Its output is discarded.
        visible = torch.where(real_query[:, :, None], visible, key[None, None, :] == 0)  # [B, T, S]

        return cls(
            token_ids=token_ids,
            slots=slots,
            token_row=token_row,
            token_index=token_index,
            token_slot=slots[token_row],
            token_pos=starts[token_row] + token_index,
            last_token=row_offsets + lengths - 1,
            max_tokens=max_tokens,
            num_keys=num_keys,
            mask=visible[:, None],  # [B, 1, T, S]
        )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / sqrt(mean(x^2) + eps), computed in float32 as LofteyRMSNorm does."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


class DenseModel:
    """Embedding, attention, norms, routers and lm_head of a Loftey model, with a slot KV cache."""

    def __init__(self, config, weights: DenseWeights, cache: KVCache, executor: ExpertExecutor) -> None:
        self.config = config
        self.weights = weights
        self.cache = cache
        self.executor = executor
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        self.eps = config.rms_norm_eps

    def attention(self, layer: int, h: torch.Tensor, batch: RaggedBatch) -> torch.Tensor:
        """Write the step's keys and values into the cache and return the attention output [N, C]."""
        w = self.weights.layers[layer]
        num_tokens = h.shape[0]
        q = F.linear(h, w.q_proj).view(num_tokens, self.num_heads, self.head_dim)  # [N, H, D]
        k = F.linear(h, w.k_proj).view(num_tokens, self.num_kv_heads, self.head_dim)  # [N, K, D]
        v = F.linear(h, w.v_proj).view(num_tokens, self.num_kv_heads, self.head_dim)  # [N, K, D]

        cache_k, cache_v = self.cache.keys[layer], self.cache.values[layer]  # [slots, K, max_seq_len, D]
        cache_k[batch.token_slot, :, batch.token_pos] = k
        cache_v[batch.token_slot, :, batch.token_pos] = v
        keys = cache_k[batch.slots, :, : batch.num_keys]  # [B, K, S, D]
        values = cache_v[batch.slots, :, : batch.num_keys]  # [B, K, S, D]

        num_rows = batch.slots.numel()
        queries = q.new_zeros(num_rows, batch.max_tokens, self.num_heads, self.head_dim)  # [B, T, H, D]
        queries[batch.token_row, batch.token_index] = q
        out = F.scaled_dot_product_attention(
            queries.transpose(1, 2),  # [B, H, T, D]
            keys,
            values,
            attn_mask=batch.mask,
            scale=self.scale,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )  # [B, H, T, D]
        out = out.transpose(1, 2)[batch.token_row, batch.token_index]  # [N, H, D]
        return F.linear(out.reshape(num_tokens, self.num_heads * self.head_dim), w.o_proj)  # [N, C]

    @torch.inference_mode()
    def forward(self, batch: RaggedBatch) -> torch.Tensor:
        """Run every layer over the batch, filling the cache, and return float32 logits [B, V] of each row's last token.

        NOTE: a row's logits can differ in the last bits with the number of
        rows in a matmul, because torch's CPU kernels take one path for 1 row,
        another for 2-3 and a third from 4 rows on. A seeded sampled request then
        gets the same tokens in any batch except at a near-tie between two
        tokens. Padding every matmul to 4 rows removes this but made the 1-row
        lm_head about 2.5x slower when measured on 2 CPU cores, so it is not done.

        Raises ExpertGroupUnavailable when the executor gives up on a layer.
        The cache positions of this step are then half written, so the caller
        must release the batch's sequences.
        """
        x = self.weights.embed_tokens[batch.token_ids]  # [N, C]
        for layer, w in enumerate(self.weights.layers):
            x = x + self.attention(layer, rms_norm(x, w.input_norm, self.eps), batch)
            h = rms_norm(x, w.post_attention_norm, self.eps)  # [N, C]
            weights, expert_ids = route(F.linear(h, w.router), self.config.topk)  # [N, A] each
            x = x + self.executor.forward_layer(layer, h, expert_ids, weights)
        last = rms_norm(x[batch.last_token], self.weights.final_norm, self.eps)  # [B, C]
        return F.linear(last, self.weights.lm_head).float()  # [B, V]

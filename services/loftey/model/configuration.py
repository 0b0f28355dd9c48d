"""Configuration of the Loftey model, read from the published config.json keys as they are."""

from __future__ import annotations

from transformers import PreTrainedConfig

# The published checkpoint normalises with this epsilon; config.json does not carry it.
RMS_NORM_EPS = 1e-6


class LofteyConfig(PreTrainedConfig):
    """Shape and routing settings of a Loftey model.

    Field names are the keys of the published config.json. The usual Hugging Face names are
    aliases of them (`num_hidden_layers` is `num_layers`, `max_position_embeddings` is
    `max_seq_len`, `num_local_experts` is `expert_num`, `num_experts_per_tok` is `topk`).
    Defaults are those of the published 235M model.
    """

    model_type = "loftey"
    keys_to_ignore_at_inference = ["cache"]
    attribute_map = {
        "num_hidden_layers": "num_layers",
        "max_position_embeddings": "max_seq_len",
        "num_local_experts": "expert_num",
        "num_experts_per_tok": "topk",
    }

    # Vocabulary size V: rows of the embedding and of lm_head.
    vocab_size: int = 151646
    # Hidden size C.
    hidden_size: int = 512
    # Inner width of each SwiGLU expert (and of the dense FFN when use_moe is false).
    intermediate_size: int = 2048
    # Number of decoder layers.
    num_layers: int = 6
    # Query heads H; the head dim D is hidden_size / H.
    num_attention_heads: int = 16
    # Key/value heads K; query head h reads KV head h // (H / K).
    num_key_value_heads: int = 8
    # Maximum sequence length (prompt plus generated tokens) the model was trained for.
    max_seq_len: int = 512
    # Experts E per MoE layer.
    expert_num: int = 4
    # Experts A that each token is routed to.
    topk: int = 2
    # Whether the FFN and expert projections carry biases.
    mlp_bias: bool = False
    # Mixture of experts when true; one dense SwiGLU FFN per layer when false.
    use_moe: bool = True
    # Epsilon of every RMSNorm.
    rms_norm_eps: float = RMS_NORM_EPS
    # Standard deviation of the random initialisation.
    initializer_range: float = 0.02
    # lm_head has its own weight in the published checkpoint.
    tie_word_embeddings: bool = False
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.check_shapes()

    @property
    def head_dim(self) -> int:
        """Width D of one attention head."""
        return self.hidden_size // self.num_attention_heads

    def check_shapes(self) -> None:
        """Raise ValueError when the sizes cannot form a model, naming the key and its bound."""
        positive = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "max_seq_len",
        )
        for key in positive:
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"config key {key} must be an integer >= 1, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"config key hidden_size must be a multiple of num_attention_heads "
                f"({self.num_attention_heads}), got {self.hidden_size}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"config key num_attention_heads must be a multiple of num_key_value_heads "
                f"({self.num_key_value_heads}), got {self.num_attention_heads}"
            )
        if self.use_moe:
            if not isinstance(self.expert_num, int) or self.expert_num < 1:
                raise ValueError(f"config key expert_num must be an integer >= 1, got {self.expert_num!r}")
            if not isinstance(self.topk, int) or not 1 <= self.topk <= self.expert_num:
                raise ValueError(
                    f"config key topk must be an integer in [1, expert_num={self.expert_num}], got {self.topk!r}"
                )

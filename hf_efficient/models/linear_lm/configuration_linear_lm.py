"""Configuration of the ``linear-lm`` family: a small Llama-like decoder with causal linear attention."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig

from ...attention.feature_maps import FEATURE_MAPS

__all__ = ["LinearLMConfig"]

POSITION_EMBEDDINGS = ("rope", "none")


@strict
class LinearLMConfig(PreTrainedConfig):
    """A decoder of pre-norm blocks: RMSNorm -> causal linear attention -> RMSNorm -> SwiGLU MLP.

    Attributes:
        vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads: the usual sizes.
        feature_map: registry name of phi (``elu``, ``relu``, ``favor``, ``hedgehog``); a learnable map
            (``hedgehog``) gets one module per layer.
        position_embedding: ``rope`` (rotary on q and k before the feature map; generation takes
            positions from the attention mask, so left padding works) or ``none`` (order only through
            causality).
        rope_theta: base of the rotary frequencies.
        attention_eps: epsilon of the linear-attention normaliser.
        chunk_size: chunk length of the chunked causal form used in training and prefill.
        rms_norm_eps, initializer_range, tie_word_embeddings: as in Llama.
    """

    model_type = "linear-lm"

    vocab_size: int = 32000
    hidden_size: int = 512
    intermediate_size: int = 1408
    num_hidden_layers: int = 6
    num_attention_heads: int = 8
    feature_map: str = "elu"
    position_embedding: str = "rope"
    rope_theta: float = 10000.0
    attention_eps: float = 1e-6
    chunk_size: int = 64
    max_position_embeddings: int = 1 << 20
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    tie_word_embeddings: bool = True

    def __post_init__(self, **kwargs):
        self._check()  # before the base class, so a bad knob is a plain ValueError naming it
        super().__post_init__(**kwargs)

    def _check(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "chunk_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"LinearLMConfig.{name} must be a positive int, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"LinearLMConfig: hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.feature_map not in FEATURE_MAPS:
            raise ValueError(
                f"LinearLMConfig.feature_map {self.feature_map!r} is unknown; accepted: "
                f"{', '.join(sorted(FEATURE_MAPS))}"
            )
        if self.position_embedding not in POSITION_EMBEDDINGS:
            raise ValueError(
                f"LinearLMConfig.position_embedding {self.position_embedding!r} is unknown; accepted: "
                f"{', '.join(POSITION_EMBEDDINGS)}"
            )
        if self.position_embedding == "rope" and (self.hidden_size // self.num_attention_heads) % 2:
            raise ValueError("LinearLMConfig: rotary embeddings need an even head dimension")
        if not self.attention_eps > 0:
            raise ValueError(f"LinearLMConfig.attention_eps must be positive, got {self.attention_eps!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

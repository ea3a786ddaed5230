"""Decoder LM, attention variants, RoPE and norms. Imports only torch and the standard library."""

from .attention import ATTENTION_KINDS, build_attention
from .config import AttentionConfig, ModelConfig
from .transformer import DecoderLM

__all__ = ["ATTENTION_KINDS", "AttentionConfig", "DecoderLM", "ModelConfig", "build_attention"]

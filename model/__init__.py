"""Kestrel's model family: config, layers, attention, transformer, KV cache, tokenizer."""

from model.config import ModelConfig, RopeScaling
from model.kv_cache import KVCache
from model.chat_template import KESTREL_TEMPLATE, ChatTemplate
from model.tokenizer import Tokenizer
from model.transformer import Transformer, init_model
from model.vision_config import VisionConfig

__all__ = ["ModelConfig", "RopeScaling", "KVCache", "Transformer", "init_model", "Tokenizer",
           "ChatTemplate", "KESTREL_TEMPLATE", "VisionConfig"]

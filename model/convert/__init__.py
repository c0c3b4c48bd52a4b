"""Checkpoint import (Hugging Face safetensors folders, GGUF files) and export (safetensors)."""

from model.convert.convert import convert_checkpoint
from model.convert.export import export_checkpoint
from model.convert.hf_config import hf_config_from_model, model_config_from_hf

__all__ = ["convert_checkpoint", "export_checkpoint", "hf_config_from_model", "model_config_from_hf"]

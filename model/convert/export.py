"""``export_checkpoint``: a Kestrel checkpoint folder -> a Hugging Face safetensors folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from model.checkpoint import atomic_output_dir, flatten_params, load_tokenizer, read_config, restore_params
from model.convert.hf_config import hf_config_from_model
from model.convert.hf_weights import params_to_hf
from model.quantization import dequantize_params

# Tokenizer files Tokenizer.save writes (HF-compatible names), copied as they are.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json", "chat_template.jinja")


def _token_ids(ckpt: Path) -> tuple[dict, dict | None]:
    """(bos/eos/pad ids for config.json, generation_config.json or None).

    transformers' ``generate`` stops on the generation config's eos ids, so every stop token of
    the tokenizer (e.g. ``<|im_end|>`` besides ``</s>``) goes there.
    """
    tokenizer = load_tokenizer(ckpt)
    if tokenizer is None:
        return {}, None
    ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
           "pad_token_id": tokenizer.pad_id}
    ids = {k: v for k, v in ids.items() if v is not None}
    stops = sorted(set(tokenizer.stop_ids) | ({ids["eos_token_id"]} if "eos_token_id" in ids else set()))
    generation = dict(ids)
    if stops:
        generation["eos_token_id"] = stops[0] if len(stops) == 1 else stops
    return ids, generation


def export_checkpoint(ckpt_dir: str | Path, out_dir: str | Path, *, force: bool = False) -> Path:
    """Writes a checkpoint as an HF folder that ``AutoModelForCausalLM.from_pretrained`` loads.

    The folder holds config.json (transformers 5 format, of the source family or the family
    that represents the config exactly), model.safetensors in the checkpoint's dtype, and the
    checkpoint's tokenizer files with a generation_config.json naming its stop tokens.

    Args:
      ckpt_dir: a Kestrel checkpoint folder.
      out_dir: the folder to create.
      force: replace an existing ``out_dir``.

    Returns:
      The absolute path of the exported folder.

    Raises:
      KestrelError: ``ckpt_dir`` is not a checkpoint, the config has no HF equivalent, or
        ``out_dir`` exists without ``force``.
    """
    ckpt = Path(ckpt_dir)
    cfg = read_config(ckpt)
    hf_config = hf_config_from_model(cfg)
    ids, generation = _token_ids(ckpt)
    hf_config.update(ids)
    with atomic_output_dir(out_dir, force=force) as tmp:
        # A quantized checkpoint exports its dequantized weights (HF has no int8 layout we match).
        params = flatten_params(dequantize_params(restore_params(ckpt)))
        tensors = params_to_hf(cfg, {k: np.asarray(v) for k, v in params.items()})
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        if generation is not None:
            (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        for name in TOKENIZER_FILES:
            if (ckpt / name).is_file():
                shutil.copy2(ckpt / name, tmp / name)
    return Path(out_dir).absolute()

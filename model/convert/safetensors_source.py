"""Reading a Hugging Face model folder: config.json and (possibly sharded) safetensors files.

Every file problem becomes a one-line KestrelError naming the file: a missing config, an index
pointing at a shard that is not there, a truncated or corrupt shard.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
from safetensors import SafetensorError

from kestrel.errors import KestrelError

INDEX = "model.safetensors.index.json"


def read_hf_config(src: Path) -> dict[str, Any]:
    path = src / "config.json"
    if not path.is_file():
        raise KestrelError(f"{src} has no config.json (not a Hugging Face model folder)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise KestrelError(f"{path} is not valid JSON: {e}") from None


class SafetensorsFolder:
    """The tensors of an HF folder, read lazily one at a time (sharded or single-file)."""

    def __init__(self, src: Path):
        self.src = src
        index = src / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise KestrelError(f"{index} is not a valid safetensors index: {e}") from None
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in src.glob("*.safetensors"))
            if not files:
                raise KestrelError(f"{src} has no *.safetensors files (and no {INDEX})")
            weight_map = None
        self._handles = {}
        self.location: dict[str, str] = {}
        for name in files:
            path = src / name
            if not path.is_file():
                raise KestrelError(f"safetensors shard {name} is missing from {src}")
            try:
                handle = safetensors.safe_open(str(path), framework="numpy")
                keys = list(handle.keys())
            except (SafetensorError, OSError) as e:
                raise KestrelError(f"safetensors shard {name} is truncated or corrupt: {e}") from None
            self._handles[name] = handle
            for key in keys:
                self.location[key] = name
        if weight_map is not None:
            for key, name in weight_map.items():
                if self.location.get(key) != name:
                    raise KestrelError(f"safetensors shard {name} lacks tensor {key!r} listed in {INDEX}")

    @property
    def names(self) -> list[str]:
        return list(self.location)

    def read(self, name: str) -> np.ndarray:
        shard = self.location[name]
        try:
            return self._handles[shard].get_tensor(name)
        except (SafetensorError, OSError, ValueError) as e:
            raise KestrelError(f"cannot read tensor {name!r} from {shard}: {e}") from None

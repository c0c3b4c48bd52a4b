"""The configuration of the vision tower (SigLIP + Gemma 3's projector), kept apart from its
code so that ``ModelConfig`` can hold one without importing any layer."""

from __future__ import annotations

import dataclasses
import math
from typing import Any


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """A SigLIP tower plus Gemma 3's projector, and how images enter the token sequence.

    Attributes:
      hidden_size: E, the tower's width.
      intermediate_size: F, the tower MLP's width.
      num_layers: encoder blocks.
      num_heads: N attention heads (E must be a multiple of N).
      image_size: the square input resolution in pixels.
      patch_size: the square patch in pixels; image_size must be a multiple of it.
      num_channels: C (3 for RGB).
      norm_eps: epsilon of the tower's LayerNorms and of the projector's RMSNorm.
      activation: the MLP's nonlinearity (SigLIP: ``gelu_tanh``).
      mm_tokens_per_image: soft tokens per image, a square number whose side divides the patch grid.
      image_token_id: the placeholder token the soft tokens replace.
      image_start_id, image_end_id: tokens that open and close an image's span in a prompt
        (Gemma 3: ``<start_of_image>`` / ``<end_of_image>``; Kestrel: ``<image>`` and none).
      image_mean, image_std: per-channel normalisation after scaling pixels to [0, 1].
      stem_channels: a convolutional stem before the patch embedding, one 3 x 3 convolution of
        stride 2 and a GELU per entry (its output channels); the patch embedding then cuts the
        stem's feature map into ``patch_size / 2 ** len(stem_channels)`` squares, so a patch still
        covers ``patch_size`` pixels. Empty (SigLIP, Gemma 3): the patch embedding reads the raw
        pixels. A linear patch embedding shares no weights inside its patch, so it learns a
        character anew at every offset; convolutions share them (Xiao et al. 2021, "Early
        convolutions help transformers see better").
    """

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int
    patch_size: int
    num_channels: int = 3
    norm_eps: float = 1e-6
    activation: str = "gelu_tanh"
    mm_tokens_per_image: int = 256
    image_token_id: int = 0
    image_start_id: int | None = None
    image_end_id: int | None = None
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    stem_channels: tuple[int, ...] = ()

    def __post_init__(self):
        for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "image_size",
                     "patch_size", "num_channels", "mm_tokens_per_image"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"VisionConfig.{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"VisionConfig.hidden_size ({self.hidden_size}) must be a multiple of "
                             f"num_heads ({self.num_heads})")
        if self.image_size % self.patch_size:
            raise ValueError(f"VisionConfig.image_size ({self.image_size}) must be a multiple of "
                             f"patch_size ({self.patch_size})")
        side = math.isqrt(self.mm_tokens_per_image)
        if side * side != self.mm_tokens_per_image or self.patches_per_side % side:
            raise ValueError(
                f"VisionConfig.mm_tokens_per_image ({self.mm_tokens_per_image}) must be a square "
                f"whose side divides the {self.patches_per_side}-patch grid side")
        if self.activation not in ("silu", "gelu_tanh", "gelu"):
            raise ValueError(f"VisionConfig.activation {self.activation!r}: use gelu_tanh, gelu or silu")
        object.__setattr__(self, "image_mean", tuple(float(x) for x in self.image_mean))
        object.__setattr__(self, "image_std", tuple(float(x) for x in self.image_std))
        if len(self.image_mean) != self.num_channels or len(self.image_std) != self.num_channels:
            raise ValueError("VisionConfig.image_mean and image_std need one value per channel")
        if any(s <= 0 for s in self.image_std):
            raise ValueError("VisionConfig.image_std values must be > 0")
        object.__setattr__(self, "stem_channels", tuple(self.stem_channels))
        if any(not isinstance(c, int) or c < 1 for c in self.stem_channels):
            raise ValueError(f"VisionConfig.stem_channels {list(self.stem_channels)} must be positive integers")
        if self.patch_size % (1 << len(self.stem_channels)):
            raise ValueError(f"VisionConfig.patch_size ({self.patch_size}) must be a multiple of "
                             f"{1 << len(self.stem_channels)}: each of the {len(self.stem_channels)} "
                             f"stem convolutions halves the resolution")

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.patches_per_side ** 2

    @property
    def stem_stages(self) -> list[tuple[int, int]]:
        """(input channels, output channels) of each stem convolution, in order."""
        return list(zip((self.num_channels,) + self.stem_channels[:-1], self.stem_channels))

    @property
    def embed_patch(self) -> int:
        """The patch embedding's square on the stem's feature map (``patch_size`` without a stem)."""
        return self.patch_size >> len(self.stem_channels)

    @property
    def embed_channels(self) -> int:
        """Channels the patch embedding reads: the stem's last, or the picture's."""
        return self.stem_channels[-1] if self.stem_channels else self.num_channels

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_params(self) -> int:
        """Parameters of tower and projector (the projector's output width excluded)."""
        e, f, p, c = self.hidden_size, self.intermediate_size, self.embed_patch, self.embed_channels
        layer = 4 * (e * e + e) + 2 * e * f + f + e + 4 * e
        stem = sum(9 * i * o + o for i, o in self.stem_stages)
        return stem + p * p * c * e + e + self.num_patches * e + self.num_layers * layer + 2 * e + e

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "VisionConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown VisionConfig fields: {unknown}")
        return cls(**data)

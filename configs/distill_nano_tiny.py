"""The tiny twin of distill_nano (the teacher is given with --set distill.teacher=DIR)."""

import dataclasses

from configs import kestrel_nano_tiny
from train.config import DistillConfig, RunConfig


def config() -> RunConfig:
    base = kestrel_nano_tiny.config()
    return dataclasses.replace(base, name="distill_nano_tiny",
                               distill=DistillConfig(teacher=None, weight=0.5, temperature=2.0))

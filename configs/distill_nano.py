"""Distil a converted teacher into kestrel-nano (set the teacher with --set distill.teacher=DIR).

The teacher must share the student's tokenizer (vocab_size is checked before anything compiles).
"""

import dataclasses

from configs import kestrel_nano
from train.config import DistillConfig, RunConfig


def config() -> RunConfig:
    base = kestrel_nano.config()
    return dataclasses.replace(base, name="distill_nano",
                               distill=DistillConfig(teacher=None, weight=0.5, temperature=2.0))

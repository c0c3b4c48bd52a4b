"""The tiny twin of ``configs/nano_vision.py``: the same pipeline (synthetic text and image tasks,
tower trained inside the step, export, serving) at a size that trains a few steps in seconds on a
CPU, for tests and smoke runs: ``configs/nano_tiny.py``'s text model plus a 32 px tower (patch 8,
one layer of width 32) pooled to 4 soft tokens per image.

``data.tokenizer`` must name a tokenizer folder (``--set data.tokenizer=DIR``); its vocabulary
must fit ``VOCAB_SIZE``.
"""

import dataclasses

from configs.nano_tiny import VOCAB_SIZE, config as nano_tiny_config  # noqa: F401
from configs.nano_vision import IMAGE_PAD_ID, IMAGE_START_ID
from model.vision_config import VisionConfig
from train.synthetic import SUITES


def config():
    base = nano_tiny_config()
    tower = VisionConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                         image_size=32, patch_size=8, mm_tokens_per_image=4,
                         image_token_id=IMAGE_PAD_ID, image_start_id=IMAGE_START_ID)
    tasks = (("arithmetic", 1.0),) + tuple((name, 1.0) for name in SUITES["vision"])
    return dataclasses.replace(
        base, name="nano_vision_tiny", model=base.model.replace(vision=tower),
        data=dataclasses.replace(base.data, seq_len=512, tasks=tasks, max_images=8))

"""kestrel-nano-vision: kestrel-nano's text model (``configs/nano.py``) plus a small SigLIP tower,
trained from scratch on the synthetic mix with the vision suite added (problems drawn as images).

The tower is sized for the issue's budget of 60 minutes on the shared 2-core CPU: 224 px images
cut into 28 px patches (an 8 x 8 grid, 64 patches), 3 layers of width 192 (3 heads of 64, MLP
768), and Gemma 3's projector (norm and linear map; its pooling is 1 x 1 here) gives the language
model one soft token per patch, 64 per image (1.85M tower and projector parameters beside the
text model's 6.2M: 8.0M in all). Coarse patches keep the tower's cost per image small beside the
language model's 2 x 1024 tokens per step. Pooled 2 x 2 to 16 soft tokens, each token would carry a
56 px square of a drawn problem (a number and a half of its text); 64 cost the same tower and about
100 more sequence tokens per batch (2 images on average).
The vision tasks (``image_text``, ``image_table``, ``image_chart``, ``image_triangle``) weigh 1
each beside the text tasks of kestrel-nano (about a fifth of the examples); a batch carries at
most ``data.max_images`` = 16 images (the step is compiled for that many; a batch with more stops
the run with a clear error). Measured over 40 batches of this mix: 2.0 images per batch on
average, 6 at most.
The ``<image>``/``<|image_pad|>`` ids are those of Kestrel's sentencepiece tokenizers (12, 13).
The steps and batch stay kestrel-nano's (2,400 of 2 x 1,024 tokens since 2026-12-01, its ~40
minutes plus the tower's share), and so does its tokenizer (checkpoints/kestrel-nano's). One image
step, forward and backward, measured alone: 1.2-1.35x a text step (the tower 0.2 s of ~2 s).
Trained in full on 2026-12-01 (57.7 min on the shared 2-core CPU, 1,403 tokens/s median;
``bench/results/nano_vision_run.json``): held-out pictures 1% right, text STEM with tools 42%
against the text-only kestrel-nano's 60%. The tower learned no digits (every number "read" is
one constant guess), so it is not bundled: its soft tokens had collapsed to one vector whatever the
picture (``bench/image_use.py``; ``bench/results/nano_vision_probe.json``, with the reading-drill and
tower-alone probes that followed). ``train/tower_pretrain.py`` pretrains this tower to see characters
first (``bench/results/tower_pretrain.json``).
Since 2026-12-03 the tower has a convolutional stem (``stem_channels=(32, 64)``: two 3 x 3 stride-2
convolutions, so the patch embedding reads 7 x 7 squares of a 56 px, 64-channel map; 2.02M tower
and projector parameters). Pretrained on the same objective it reads 35.7% of held-out characters
after 3,000 steps (25 min) where the linear patch embedding read 20.5% (14 min) and 29.6% after
9,000; its step costs about 1.6x. The full run above used the linear embedding
(``--set 'model.vision.stem_channels=()'`` reproduces it).
The pictures have been drawn for 224 px since 2026-12-03 (224..288 px canvases, text of 16 px or
more; ``train/synthetic/drawing.py``): ``--lr 3e-3`` pretraining then reads 51.7% of held-out
characters after 3,000 steps, 62.3% after 6,000 and 67.6% after 9,000 (``legible_pictures`` in the
same JSON).

    kestrel train --config configs/nano_vision.py --workdir runs/nano_vision     # <= 60 min, 2-core CPU
    python -m train.export runs/nano_vision checkpoints/kestrel-nano-vision --config configs/nano_vision.py
    kestrel eval checkpoints/kestrel-nano-vision --suite vision --constrained
"""

import dataclasses

from configs.nano import config as nano_config
from model.vision_config import VisionConfig
from train.synthetic import SUITES

IMAGE_START_ID, IMAGE_PAD_ID = 12, 13  # <image>, <|image_pad|> in Kestrel's sentencepiece models


def vision_tower() -> VisionConfig:
    return VisionConfig(hidden_size=192, intermediate_size=768, num_layers=3, num_heads=3,
                        image_size=224, patch_size=28, mm_tokens_per_image=64, stem_channels=(32, 64),
                        image_token_id=IMAGE_PAD_ID, image_start_id=IMAGE_START_ID)


def config():
    base = nano_config()
    tasks = tuple(base.data.tasks) + tuple((name, 1.0) for name in SUITES["vision"])
    return dataclasses.replace(
        base, name="nano_vision", model=base.model.replace(vision=vision_tower()),
        data=dataclasses.replace(base.data, tasks=tasks, max_images=16))

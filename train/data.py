"""The training data pipeline: synthetic STEM + tool-use conversations, packed, on a curriculum.

Batch ``s`` is a pure function of ``(seed, s)``: its examples are ``mixture_at(seed_s, j, ...)``
for j = 0, 1, ... with the curriculum's level mix at step ``s`` (``seed_s`` is derived from the
seed and the step), rendered with ``render_kestrel``, tokenized segment by segment and packed
first-fit into [B, T] rows (``train/packing.py``). So the iterator's whole state is the index of
the next batch, a resumed run sees exactly the batches of an uninterrupted one, and the level mix
of every batch follows the schedule exactly.

grain runs it: ``MapDataset.range(start, ...)`` of batch indices, ``.map`` of the batch builder,
``to_iter_dataset`` with reader threads, and optionally ``mp_prefetch`` worker processes (on a
GPU host one Python thread cannot keep up with the step: a 64 x 1024 batch takes ~0.2 s).

    data = SyntheticBatches(SyntheticDataConfig(tokenizer="checkpoints/kestrel-nano",
                                                batch_size=8, seq_len=1024))
    batch = next(data)          # {"tokens", "targets", "loss_mask", "segment_ids", "positions"}
    state = data.get_state()    # {"next_batch": 1}

A mix with image tasks (``tasks=(("vision", 1.0), ...)``) adds ``image_span_ids`` [B, T] and
``images`` (PNG bytes) to every batch, each ``<image>`` followed by ``image_tokens`` pad tokens (the
contract is in ``train/image_tokens.py``).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import os
import sys
from typing import Any, Iterator

import grain
import numpy as np

from kestrel.errors import KestrelError
from train.curriculum import Curriculum
from train.image_tokens import check_tokenizer_matches_tower, expand_images, has_vision_tower, image_token_ids
from train.packing import PackStats, TokenizedExample, pack_batch, tokenize_segments
from train.piece_dropout import DroppingEncoder, PieceDropout
from train.synthetic import IMAGE_TASKS, SUITES, Example, mixture_at, render_kestrel, render_session, task_weights
from train.synthetic.registry import check_efforts

# The data.source value that names this module's factory.
SYNTHETIC_SOURCE = "train.data:synthetic_batches"

# Where the data factory finds the tokenizer when the run config names none.
TOKENIZER_ENV = "KESTREL_DATA_TOKENIZER"


def stream_seed(seed: int, step: int, tag: str = "train") -> int:
    """A 63-bit seed for the example stream of batch `step`, distinct per (tag, seed, step)."""
    digest = hashlib.blake2b(f"kestrel/{tag}/{seed}/{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclasses.dataclass(frozen=True)
class SyntheticDataConfig:
    """Settings of the synthetic pipeline.

    Attributes:
      tokenizer: a folder ``model.tokenizer.Tokenizer.load`` reads (a checkpoint or the output of
        ``train/nano_tokenizer.py``).
      batch_size: B.
      seq_len: T.
      seed: the data seed.
      curriculum: level weights over steps; None is a constant uniform mix over levels 1..5.
      tasks: task -> weight; a suite name stands for its tasks (``("vision", 1.0)``: the four
        image tasks at 1/4 each). Default every text task (``TEXT_TASKS``) with weight 1.
      tools_fraction: the share of STEM examples that offer tools.
      train_history: also learn earlier assistant turns of multi-turn conversations.
      session_size: up to this many consecutive STEM problems of the stream (with the same tools)
        become one conversation (``render_session``: one system/tools header, every exchange
        trained, reasoning kept), k drawn uniformly from 1..session_size per conversation; the
        header is then paid once for k problems. 1 keeps one problem per conversation.
      num_threads: grain reader threads (batches built in parallel in this process).
      prefetch: batches grain keeps ready.
      num_workers: grain worker processes (``mp_prefetch``); 0 keeps everything in-process.
      image_tokens: soft tokens per image (the run of ``<|image_pad|>`` after each ``<image>``),
        for mixes with image tasks.
      efforts: ``((effort, weight), ...)``: the reasoning effort each stem, vision and
        function-calling example is asked at (``train.synthetic.mixture``; the effort ``None``:
        no hint); None: no hints at all. A session's problems share the first one's effort.
      piece_dropout: the probability that a token of the encoded text is split into two
        vocabulary pieces that spell it (and each half again; ``train/piece_dropout.py``), so
        that pieces the plain encoding never produces are trained too; 0 (the default) encodes
        plainly. Drawn from the batch's seed: a batch stays a function of its step.
    """

    tokenizer: str
    batch_size: int = 8
    seq_len: int = 1024
    seed: int = 0
    curriculum: Curriculum | None = None
    tasks: tuple[tuple[str, float], ...] | None = None
    tools_fraction: float = 0.8
    train_history: bool = False
    session_size: int = 1
    num_threads: int = 1
    prefetch: int = 2
    num_workers: int = 0
    image_tokens: int = 64
    efforts: tuple[tuple[str | None, float], ...] | None = None
    piece_dropout: float = 0.0

    def __post_init__(self):
        if self.batch_size < 1 or self.seq_len < 2:
            raise ValueError(f"batch_size must be >= 1 and seq_len >= 2, got {self.batch_size}, {self.seq_len}")
        if not 0 <= self.tools_fraction <= 1:
            raise ValueError(f"tools_fraction must be in [0, 1], got {self.tools_fraction}")
        if self.tasks is not None:
            tasks = tuple(dict(self.tasks).items())
            task_weights(dict(tasks))  # names and weights checked here, not in a reader thread
            object.__setattr__(self, "tasks", tasks)
        if self.session_size < 1:
            raise ValueError(f"session_size must be >= 1, got {self.session_size}")
        if self.num_threads < 0 or self.prefetch < 0 or self.num_workers < 0:
            raise ValueError("num_threads, prefetch and num_workers must be >= 0")
        if self.image_tokens < 1:
            raise ValueError(f"image_tokens must be >= 1, got {self.image_tokens}")
        if not 0.0 <= self.piece_dropout < 1.0:
            raise ValueError(f"piece_dropout must be in [0, 1), got {self.piece_dropout}")
        if self.efforts is not None:
            efforts = tuple(dict(self.efforts).items())
            check_efforts(dict(efforts))
            object.__setattr__(self, "efforts", efforts)

    @property
    def task_weights(self) -> dict[str, float]:
        return task_weights(dict(self.tasks) if self.tasks is not None else None)

    @property
    def with_images(self) -> bool:
        """Whether the mix draws image tasks, so batches carry images."""
        return any(w > 0 and name in IMAGE_TASKS for name, w in self.task_weights.items())

    @property
    def schedule(self) -> Curriculum:
        return self.curriculum or Curriculum.constant((1.0,) * 5)


class BatchBuilder:
    """``step -> packed batch``: the pure function grain maps over batch indices.

    Picklable (for grain worker processes): the tokenizer is loaded lazily in each process.
    """

    def __init__(self, config: SyntheticDataConfig):
        self.config = config
        self._tokenizer = None
        self._dropout = None

    def __getstate__(self) -> dict:
        return {"config": self.config, "_tokenizer": None, "_dropout": None}

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.config.tokenizer)
        return self._tokenizer

    def encoder(self, step: int):
        """What batch `step`'s text is encoded with: the tokenizer, or with piece dropout on, the
        tokenizer followed by dropout drawn from the step's own seed."""
        if not self.config.piece_dropout:
            return self.tokenizer
        if self._dropout is None:
            self._dropout = PieceDropout(self.tokenizer, self.config.piece_dropout)
        rng = np.random.default_rng(stream_seed(self.config.seed, step, tag="piece_dropout"))
        return DroppingEncoder(self.tokenizer, self._dropout, rng)

    def examples(self, step: int) -> Iterator[Example]:
        """The endless example stream batch `step` is packed from."""
        c = self.config
        seed, levels, tasks = stream_seed(c.seed, step), c.schedule.levels_at(step), c.task_weights
        efforts = dict(c.efforts) if c.efforts else None
        j = 0
        while True:
            yield mixture_at(seed, j, levels, "train", tasks, c.tools_fraction, efforts)
            j += 1

    def conversations(self, step: int) -> Iterator[list[Example]]:
        """The stream of batch `step` grouped into conversations (see ``session_size``).

        A STEM problem opens a session of k problems; the next STEM problems of the stream with
        the same tools join it, and the examples passed over on the way wait, in order, to open
        the following conversations.
        """
        c = self.config
        rng = np.random.default_rng(stream_seed(c.seed, step, tag="sessions"))
        stream = self.examples(step)
        waiting: collections.deque[Example] = collections.deque()
        while True:
            first = waiting.popleft() if waiting else next(stream)
            group = [first]
            if c.session_size > 1 and first.meta["task"] in SUITES["stem"]:
                want = int(rng.integers(1, c.session_size + 1))
                def mate(ex: Example) -> bool:
                    return (ex.meta["task"] in SUITES["stem"] and ex.tools == first.tools
                            and ex.meta.get("effort") == first.meta.get("effort"))

                mates = [ex for ex in waiting if mate(ex)]
                for ex in mates[:want - 1]:
                    waiting.remove(ex)
                    group.append(ex)
                while len(group) < want and len(waiting) < 16:
                    ex = next(stream)
                    if mate(ex):
                        group.append(ex)
                    else:
                        waiting.append(ex)
            yield group

    def build(self, step: int) -> tuple[dict[str, np.ndarray], PackStats, list[Example]]:
        """Batch `step`, its packing stats and the examples placed in it (in placement order)."""
        seen: list[list[Example]] = []

        with_images = self.config.with_images
        image_ids = image_token_ids(self.tokenizer) if with_images else None
        encoder = self.encoder(step)

        def tokenized() -> Iterator[TokenizedExample]:
            for group in self.conversations(step):
                seen.append(group)
                segs = (render_session(group) if len(group) > 1
                        else render_kestrel(group[0], train_history=self.config.train_history))
                ex = tokenize_segments(encoder, segs)
                if with_images:
                    ex = expand_images(ex, [png for e in group for png in e.images], *image_ids,
                                       self.config.image_tokens)
                yield ex

        pad = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else 0
        batch, stats = pack_batch(tokenized(), self.config.batch_size, self.config.seq_len, pad_id=pad,
                                  with_images=with_images)
        return batch, stats, [ex for k in stats.placed for ex in seen[k]]

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        return self.build(int(step))[0]


def load_tokenizer(directory: str):
    """The tokenizer in `directory` (a checkpoint or a tokenizer folder).

    Raises:
      KestrelError: no tokenizer there.
    """
    from model.tokenizer import Tokenizer

    return Tokenizer.load(directory)


class SyntheticBatches:
    """An endless iterator of packed synthetic batches with ``get_state()``/``set_state()``.

    Each batch is a dict of numpy arrays, all [B, T]: ``tokens`` and ``targets`` (int32; the
    target is the next token of the same example), ``loss_mask`` (float32; 1 exactly where the
    target is an assistant token of the final exchange), ``segment_ids`` (int32, 1.. per example
    in a row, 0 on padding) and ``positions`` (int32, restarting at 0 per example); a mix with
    image tasks adds ``image_span_ids`` (int32 [B, T]) and ``images`` (list of PNG bytes).
    """

    def __init__(self, config: SyntheticDataConfig):
        self.config = config
        self.builder = BatchBuilder(config)
        tok = self.builder.tokenizer  # fail now, not in a reader thread, if the folder is wrong
        del tok
        self._next = 0
        self._it = None

    def _pipeline(self, start: int):
        c = self.config
        ds = grain.MapDataset.range(start, sys.maxsize).map(self.builder)
        it = ds.to_iter_dataset(grain.ReadOptions(num_threads=c.num_threads, prefetch_buffer_size=c.prefetch))
        if c.num_workers > 0:
            # grain's workers read absl flags; outside absl.app.run they are not parsed yet.
            from absl import flags

            if not flags.FLAGS.is_parsed():
                flags.FLAGS.mark_as_parsed()
            it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=c.num_workers))
        return iter(it)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._it is None:
            self._it = self._pipeline(self._next)
        batch = next(self._it)
        self._next += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        """``{"next_batch": s}``: the index of the batch ``next()`` returns."""
        return {"next_batch": self._next}

    def set_state(self, state: dict[str, Any]) -> None:
        """Resumes at ``state["next_batch"]`` (what ``get_state`` returned)."""
        if not isinstance(state, dict) or "next_batch" not in state:
            raise ValueError(f"data state must be a dict with 'next_batch', got {state!r}")
        nxt = int(state["next_batch"])
        if nxt < 0:
            raise ValueError(f"data state next_batch must be >= 0, got {nxt}")
        self._next, self._it = nxt, None  # the pipeline restarts lazily at the new index

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """Batch `step` built directly (no prefetch): what the iterator yields at that index."""
        return self.builder(step)


def synthetic_batches(run_config) -> SyntheticBatches:
    """The loop's data factory: ``data.source = "train.data:synthetic_batches"``.

    Reads ``run_config.data`` (``batch_size``, ``seq_len``, ``seed``, and, where the config has
    them, ``tokenizer``, ``curriculum``, ``tasks``, ``tools_fraction``, ``num_workers``,
    ``image_tokens``); the tokenizer folder falls back to ``$KESTREL_DATA_TOKENIZER``, the
    curriculum to ``Curriculum.default(run_config.steps)``, the soft tokens per image to the
    model's ``vision.mm_tokens_per_image``.

    Raises:
      KestrelError: no tokenizer given, one larger than the model's vocabulary, image tasks in
        the mix of a model without a vision tower, or image tokens that disagree with the tower.
    """
    data = run_config.data
    tokenizer = getattr(data, "tokenizer", None) or os.environ.get(TOKENIZER_ENV)
    if not tokenizer:
        raise KestrelError("the synthetic data source needs a tokenizer folder: set data.tokenizer or "
                           f"${TOKENIZER_ENV} (train one with `python -m train.nano_tokenizer OUT`)")
    curriculum = data.curriculum or Curriculum.default(run_config.steps)
    image_tokens = getattr(data, "image_tokens", None)
    tower = run_config.model.vision if has_vision_tower(run_config.model) else None
    if tower is not None:
        made = int(tower.mm_tokens_per_image)
        if image_tokens not in (None, made):
            raise KestrelError(f"data.image_tokens={image_tokens} but the vision tower makes {made} soft "
                               "tokens per image; leave data.image_tokens unset")
        image_tokens = made
    config = SyntheticDataConfig(
        tokenizer=str(tokenizer), batch_size=data.batch_size, seq_len=data.seq_len, seed=data.seed,
        curriculum=curriculum, tasks=tuple(dict(data.tasks).items()) if data.tasks else None,
        tools_fraction=data.tools_fraction, session_size=data.session_size,
        num_threads=getattr(data, "num_threads", 1), num_workers=getattr(data, "num_workers", 0),
        image_tokens=image_tokens or 64, efforts=getattr(data, "efforts", None),
        piece_dropout=getattr(data, "piece_dropout", 0.0))
    if config.with_images and tower is None:
        raise KestrelError("data.tasks include image tasks but the model has no vision tower "
                           "(model.vision is unset); drop them or train a model that takes images")
    batches = SyntheticBatches(config)
    if config.with_images:
        check_tokenizer_matches_tower(batches.builder.tokenizer, run_config.model)
    vocab = batches.builder.tokenizer.vocab_size
    if vocab > run_config.model.vocab_size:
        raise KestrelError(f"tokenizer {tokenizer!r} has {vocab} ids but model.vocab_size is "
                           f"{run_config.model.vocab_size}")
    return batches

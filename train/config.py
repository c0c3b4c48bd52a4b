"""The run config: a frozen dataclass tree loaded from ``configs/NAME.py``, with ``--set`` overrides.

A config file is a Python module with a ``config()`` function returning a :class:`RunConfig`.
``--set key=value`` overrides any field by its dotted path (``optimizer.learning_rate=3e-4``,
``mesh.fsdp=4``, ``model.num_layers=2``); an unknown key is refused with the closest known keys.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import math
import pathlib
import typing
from typing import Any

from kestrel.errors import KestrelError
from model.config import ModelConfig
from model.kernels.attention import Impl
from sharding.distributed import DistributedConfig
from sharding.mesh import MeshConfig
from sharding.rules import STRATEGIES
from train.curriculum import Curriculum

# The values of ``RunConfig.attention``: model/kernels/attention.py's ``Impl``.
ATTENTION_IMPLS = typing.get_args(Impl)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW (or Muon) with linear warmup and cosine decay, after global-norm gradient clipping.

    Attributes:
      kind: ``adamw``, or ``muon``: the hidden layers' weight matrices (attention projections,
        MLPs, the token-shift mix) updated by Muon (momentum orthogonalised by Newton-Schulz,
        ``optax.contrib.muon``) at AdamW's update size (consistent RMS 0.2, so the same learning
        rate fits both), everything else (embeddings, output head, norms, biases, the vision
        tower) by AdamW as with ``adamw``.
      learning_rate: the peak learning rate, reached after ``warmup_steps``.
      warmup_steps: linear warmup from 0.
      decay_steps: steps of cosine decay after warmup; ``None`` decays until the run's last step.
      end_lr_ratio: the final learning rate as a fraction of the peak.
      b1, b2, eps: Adam's moment decays and epsilon.
      weight_decay: decoupled weight decay, applied to matrices only (not norms or biases).
      clip_norm: global gradient-norm clip; ``None`` or 0 disables it.
      frozen: parameter path prefixes (``vision``, ``vision/blocks/0``, ``embed``) whose
        parameters the run leaves as they start (from ``init_from``): no update, no weight decay,
        and their gradients take no share of the clipping norm. The
        usual use: train the language model to read a pretrained vision tower without changing it.
    """

    kind: str = "adamw"
    learning_rate: float = 3e-4
    warmup_steps: int = 100
    decay_steps: int | None = None
    end_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float | None = 1.0
    frozen: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where batches come from.

    Attributes:
      source: ``toy`` (the deterministic source in ``train/toy_data.py``) or ``module:function``,
        a factory called as ``function(run_config)`` that returns an iterator of global batches
        (dicts of ``tokens``, ``targets``, ``loss_mask``, ``segment_ids``, ``positions``, each
        [B, T]); it may have ``get_state()``/``set_state()`` to be checkpointed.
      batch_size: B, the global batch in sequences.
      seq_len: T.
      seed: the data seed.
      tokenizer: a tokenizer (checkpoint) folder, for sources that tokenize text.
      num_workers: data worker processes, for sources that have them.
      curriculum: level weights over steps for the synthetic source (None: easy to hard over the
        run, ``Curriculum.default(steps)``).
      tasks: ``((task, weight), ...)`` for the synthetic source; a suite name (``stem``, ``tools``,
        ``vision``, ...) stands for its tasks (None: every text task, weight 1).
      tools_fraction: the share of synthetic STEM examples that offer tools.
      session_size: up to this many STEM problems per synthetic conversation (see
        ``train.data.SyntheticDataConfig``).
      image_tokens: soft tokens per image for mixes with image tasks (``tasks`` naming
        ``vision`` or ``image_*``; the model needs a vision tower); None takes the tower's
        ``mm_tokens_per_image``.
      max_images: the images one batch may carry; the loop pads every image batch to this many so
        the train step compiles once (the tower runs on the padding too: keep it near the mixes'
        real count). None: as many as the batch can hold, ``B * (T // (M + 1))``.
      efforts: ``((effort, weight), ...)`` for the synthetic source: the reasoning effort
        (low, medium, high, auto; None for no hint) each stem and function-calling example is
        asked at, its reasoning as long as the effort asks (``train/synthetic/problem.py``).
        None: no effort hints (every trace in full).
      piece_dropout: for the synthetic source, the probability that a token of the encoded text
        is split into two vocabulary pieces that spell it (``train/piece_dropout.py``); 0: none.
    """

    source: str = "toy"
    batch_size: int = 8
    seq_len: int = 128
    seed: int = 0
    tokenizer: str | None = None
    num_workers: int = 0
    curriculum: Curriculum | None = None
    tasks: tuple[tuple[str, float], ...] | None = None
    tools_fraction: float = 0.8
    session_size: int = 1
    image_tokens: int | None = None
    max_images: int | None = None
    efforts: tuple[tuple[str | None, float], ...] | None = None
    piece_dropout: float = 0.0


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpoints under ``WORKDIR/checkpoints``.

    Attributes:
      every_steps: save every this many steps (and at the last step); 0 disables saving.
      keep: how many recent checkpoints to keep.
      async_save: write in the background while training continues.
    """

    every_steps: int = 1000
    keep: int = 3
    async_save: bool = True


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """Distillation from a teacher sharing the student's tokenizer.

    Attributes:
      teacher: a converted Kestrel checkpoint folder, or ``None`` for no distillation.
      weight: the loss is ``(1 - weight) * cross_entropy + weight * KL(teacher || student)``.
      temperature: softmax temperature of both distributions in the KL term (scaled by T^2).
    """

    teacher: str | None = None
    weight: float = 0.5
    temperature: float = 1.0


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything a training run needs; ``configs/NAME.py`` returns one.

    Attributes:
      name: the run's name (shown in logs).
      model: the student architecture (its ``dtype``/``param_dtype`` are overridden by
        ``compute_dtype`` and float32 master weights).
      steps: total optimizer steps.
      seed: parameter initialisation and RNG seed.
      compute_dtype: activation dtype (``bfloat16`` by default; parameters stay float32).
      strategy: ``dp``, ``fsdp`` or ``fsdp_tp`` (see ``sharding/rules.py``).
      z_loss: weight of the z-loss ``log(Z)^2`` that keeps logits from drifting; 0 disables it.
      early_exit_weight: weight of each early-exit head's cross entropy (the model's
        ``exit_layers``); 0 trains the final head only.
      log_every: progress-bar and JSONL interval in steps.
      peak_flops_per_device: for the MFU estimate; ``None`` looks the device kind up.
      attention: the attention implementation of the training step (``auto``, ``reference``,
        ``xla``, ``pallas``, ``cudnn``, ``grouped``; see ``model/kernels/attention.py``). On
        XLA:CPU ``xla`` trains a packed 4 x 1024 batch ~1.8x faster than ``auto`` (the
        reference) and ``grouped`` 1.15x faster than ``xla``.
      init_from: a Kestrel checkpoint folder (``config.json`` + ``params/``: a converted model or
        an exported run) whose parameters start the run instead of a random initialisation:
        fine-tuning. Its architecture must match ``model``; parameters it lacks (exit heads added
        by ``exit_layers``) keep their initialisation. Ignored when ``--resume`` finds a
        checkpoint of this run.
      logits_share: the share of each row's positions whose logits the step computes. Below 1,
        a row's loss-mask positions are gathered (in order, padded to ``ceil(logits_share *
        seq_len)``) before the vocabulary projection, so the [T, V] logits and their softmax are
        paid only where the loss reads them; the loss is the same. A batch with a row holding
        more loss tokens than that takes a step that computes every position's logits (said once
        in the log; one more compilation). 1.0 computes every position's logits. The vocabulary
        projection was ~1/3 of the nano step's matmuls while ~30% of its positions carry loss.
      compiler_options: XLA options for the jitted init and step, e.g.
        ``{"xla_backend_optimization_level": 0}``, which compiles CPU smoke runs several times
        faster.
    """

    model: ModelConfig
    name: str = "run"
    steps: int = 1000
    seed: int = 0
    compute_dtype: str = "bfloat16"
    strategy: str = "fsdp"
    z_loss: float = 0.0
    early_exit_weight: float = 0.0
    log_every: int = 1
    peak_flops_per_device: float | None = None
    attention: str = "auto"
    init_from: str | None = None
    logits_share: float = 1.0
    compiler_options: dict | None = None
    mesh: MeshConfig = MeshConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    data: DataConfig = DataConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    distill: DistillConfig = DistillConfig()
    distributed: DistributedConfig = DistributedConfig()

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy {self.strategy!r} is unknown; choose one of {sorted(STRATEGIES)}")
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(f"attention {self.attention!r} is unknown; choose one of {ATTENTION_IMPLS}")
        if self.compute_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"compute_dtype must be float32 or bfloat16, got {self.compute_dtype!r}")
        for name in ("steps", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.data.batch_size < 1 or self.data.seq_len < 1:
            raise ValueError("data.batch_size and data.seq_len must be >= 1")
        if not 0.0 < self.logits_share <= 1.0:
            raise ValueError(f"logits_share must be in (0, 1], got {self.logits_share}")
        if self.early_exit_weight < 0:
            raise ValueError(f"early_exit_weight must be >= 0, got {self.early_exit_weight}")
        if self.early_exit_weight and not self.model.exit_layers:
            raise ValueError("early_exit_weight needs exit heads: set model.exit_layers")
        if not 0.0 <= self.distill.weight <= 1.0:
            raise ValueError(f"distill.weight must be in [0, 1], got {self.distill.weight}")
        if self.distill.temperature <= 0:
            raise ValueError(f"distill.temperature must be > 0, got {self.distill.temperature}")

    @property
    def logit_positions(self) -> int | None:
        """Positions per row whose logits the step computes; None for all of them."""
        if self.logits_share >= 1.0:
            return None
        return max(1, math.ceil(self.logits_share * self.data.seq_len))

    @property
    def student(self) -> ModelConfig:
        """The model config as trained: float32 master weights, ``compute_dtype`` activations."""
        return self.model.replace(dtype=self.compute_dtype, param_dtype="float32")


def load_config(path: str | pathlib.Path) -> RunConfig:
    """Imports ``path`` and calls its ``config()``.

    Raises:
      KestrelError: the file is missing, has no ``config()``, or returns something else.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise KestrelError(f"config file {str(path)!r} does not exist")
    spec = importlib.util.spec_from_file_location(f"kestrel_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # the user's file: report it in one line
        raise KestrelError(f"config file {str(path)!r} failed to load: {type(e).__name__}: {e}") from e
    if not callable(getattr(module, "config", None)):
        raise KestrelError(f"config file {str(path)!r} must define a function config() -> RunConfig")
    cfg = module.config()
    if not isinstance(cfg, RunConfig):
        raise KestrelError(f"config() in {str(path)!r} returned {type(cfg).__name__}, not RunConfig")
    return cfg


def config_keys(cfg: Any, prefix: str = "") -> list[str]:
    """Every dotted key ``--set`` accepts for a config."""
    keys = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            keys.extend(config_keys(value, f"{prefix}{f.name}."))
        else:
            keys.append(prefix + f.name)
    return keys


def parse_value(text: str, current: Any) -> Any:
    """Parses an override's text as a Python literal, typed after the field's current value."""
    lowered = text.strip().lower()
    if lowered in ("none", "null"):
        return None
    if isinstance(current, bool) or lowered in ("true", "false"):
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ValueError(f"expected true or false, got {text!r}")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    if isinstance(current, str):
        return text if not isinstance(value, str) else value
    if isinstance(current, float) and isinstance(value, int):
        return float(value)
    if isinstance(current, int) and isinstance(value, float) and value.is_integer():
        return int(value)
    if current is not None and type(value) is not type(current) and not (
            isinstance(current, tuple) and isinstance(value, (list, tuple))):
        raise ValueError(f"expected a {type(current).__name__}, got {text!r}")
    return tuple(value) if isinstance(current, tuple) else value


def _replace(cfg: Any, path: list[str], value: Any) -> Any:
    if len(path) == 1:
        return dataclasses.replace(cfg, **{path[0]: value})
    child = getattr(cfg, path[0])
    return dataclasses.replace(cfg, **{path[0]: _replace(child, path[1:], value)})


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """Applies ``key=value`` overrides in order.

    Raises:
      KestrelError: a malformed override, an unknown key (with the closest known keys), or a value
        the field rejects.
    """
    keys = config_keys(cfg)
    for item in overrides:
        if "=" not in item:
            raise KestrelError(f"--set {item!r}: expected key=value")
        key, text = item.split("=", 1)
        key = key.strip()
        if key not in keys:
            close = difflib.get_close_matches(key, keys, n=3, cutoff=0.5)
            if not close:  # the last component alone often finds the field under another section
                leaf = key.rsplit(".", 1)[-1]
                close = [k for k in keys if k.rsplit(".", 1)[-1] == leaf] or \
                    difflib.get_close_matches(leaf, keys, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise KestrelError(f"--set {key}: unknown config key{hint}")
        current = cfg
        for part in key.split("."):
            current = getattr(current, part)
        try:
            value = parse_value(text, current)
            if key == "model.num_layers" and len(set(cfg.model.layer_types)) == 1:
                # A uniform stack stays uniform at its new depth.
                cfg = _replace(cfg, ["model"], cfg.model.replace(
                    num_layers=value, layer_types=(cfg.model.layer_types[0],) * value))
                continue
            cfg = _replace(cfg, key.split("."), value)
        except (ValueError, TypeError) as e:
            raise KestrelError(f"--set {key}={text}: {e}") from e
    return cfg

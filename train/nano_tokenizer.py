"""Trains kestrel-nano's sentencepiece tokenizer on text from the synthetic generator.

The corpus is whole conversations as ``render_kestrel`` writes them (system prompt, tool schemas,
questions, reasoning, tool calls and results), drawn from the training split over every task and
level, so the vocabulary covers exactly the text the model trains on. The tokenizer itself is
``model.tokenizer.Tokenizer.train_sentencepiece``: BPE with byte fallback (any text encodes),
numbers cut into three-digit chunks (``"5285656" -> "528" "565" "6"``, the same wherever the
number appears: a tiny model learns to copy a few distinctive tokens far sooner than a run of
single digits, each of which occurs everywhere), and DESIGN.md's chat tokens (``<|im_start|>``, ``<think>``, ``<tool_call>``, ...)
as single ids, plus the ChatML/Qwen3 chat template. ``--separate-spaces`` makes every space its
own token, so a word is the same pieces in a sentence, an identifier and a JSON string (copied,
not re-spelled, into a call; ~37% more tokens; README's kestrel-nano section has what it did).
``--letters-alone`` cuts a lone letter after a space as "▁" and the letter, so an equation's
variable ("9k") is the same token in the reasoning ("Collect k"); with ``--from DIR`` it edits an
existing tokenizer instead of training one (every id keeps its number, so the config's embedding
rows still fit; README's kestrel-nano section has what a full run on it did).

    python -m train.nano_tokenizer checkpoints/kestrel-nano-tokenizer --vocab-size 32768
    python -m train.nano_tokenizer OUT --from checkpoints/kestrel-nano --letters-alone
"""

from __future__ import annotations

import argparse
import os
from typing import Iterator

from model.tokenizer import Tokenizer
from train.data import stream_seed
from train.synthetic import TEXT_TASKS, mixture_at, render_kestrel

ALL_LEVELS = {1: 1.0, 2: 1.0, 3: 1.0, 4: 1.0, 5: 1.0}


def corpus(n: int, seed: int = 0, *, tools_fraction: float = 0.8) -> Iterator[str]:
    """`n` rendered training conversations, uniform over tasks and levels 1..5.

    Args:
      n: how many conversations.
      seed: the stream seed (its examples differ from every training batch's stream).
      tools_fraction: the share of STEM examples that offer tools.

    Yields:
      The full chat text of each conversation.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    base = stream_seed(seed, 0, tag="tokenizer")
    tasks = {name: 1.0 for name in TEXT_TASKS}  # the text the bundled tokenizer was trained on
    for i in range(n):
        ex = mixture_at(base, i, ALL_LEVELS, "train", tasks, tools_fraction)
        yield "".join(text for text, _ in render_kestrel(ex))


def train_nano_tokenizer(out_dir: str | os.PathLike | None = None, *, vocab_size: int = 32768,
                         n_examples: int = 20_000, seed: int = 0, number_chunks: bool = True,
                         separate_spaces: bool = False, letters_alone: bool = False) -> Tokenizer:
    """Trains the tokenizer and optionally saves it (``tokenizer.model`` + ``tokenizer_config.json``).

    Args:
      out_dir: a folder to save into (created), or None.
      vocab_size: the target vocabulary; the result may be smaller when the corpus has fewer
        distinct pieces (the generator's text is regular), never larger.
      n_examples: conversations in the corpus.
      seed: the corpus seed.
      number_chunks: numbers as three-digit chunks (False: single digits).
      separate_spaces: every space its own token, so words are cut alike in prose and in
        identifiers (False: sentencepiece's usual ``"▁word"`` pieces).
      letters_alone: a lone letter after a space is "▁" and the letter.

    Returns:
      The trained `Tokenizer`; its ``vocab_size`` is what the model's embedding needs at least.
    """
    return Tokenizer.train_sentencepiece(corpus(n_examples, seed), vocab_size, out_dir,
                                         number_chunks=number_chunks, separate_spaces=separate_spaces,
                                         letters_alone=letters_alone)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", help="folder to write tokenizer.model and tokenizer_config.json into")
    parser.add_argument("--vocab-size", type=int, default=None, help="default 32768")
    parser.add_argument("--examples", type=int, default=None, help="conversations in the corpus (default 20000)")
    parser.add_argument("--seed", type=int, default=None, help="the corpus seed (default 0)")
    parser.add_argument("--number-chunks", action=argparse.BooleanOptionalAction, default=None,
                        help="numbers as three-digit chunks (--no-number-chunks: single digits)")
    parser.add_argument("--separate-spaces", action=argparse.BooleanOptionalAction, default=None,
                        help="every space its own token, so a word is the same pieces in prose and identifiers")
    parser.add_argument("--letters-alone", action=argparse.BooleanOptionalAction, default=False,
                        help='a lone letter after a space as "▁" and the letter (a variable one token everywhere)')
    parser.add_argument("--from", dest="source", default=None,
                        help="edit this tokenizer folder (with --letters-alone) instead of training one")
    args = parser.parse_args(argv)
    # Only the training options given, so that train_nano_tokenizer's defaults apply to the rest
    # and --from can refuse them.
    given = {flag: value for flag, value in (("vocab_size", args.vocab_size), ("n_examples", args.examples),
                                             ("seed", args.seed), ("number_chunks", args.number_chunks),
                                             ("separate_spaces", args.separate_spaces)) if value is not None}
    if args.source is not None:
        if not args.letters_alone:
            parser.error("--from edits an existing tokenizer: give the edit (--letters-alone)")
        if given:
            flags = ", ".join("--" + ("examples" if k == "n_examples" else k.replace("_", "-")) for k in given)
            parser.error(f"{flags} shape a tokenizer being trained; --from edits an existing one")
        tok = Tokenizer.load(args.source).with_letters_alone()
        tok.save(args.out)
    else:
        tok = train_nano_tokenizer(args.out, letters_alone=args.letters_alone, **given)
    print(f"wrote {args.out}: {tok.vocab_size} ids")


if __name__ == "__main__":
    main()

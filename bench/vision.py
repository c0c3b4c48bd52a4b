"""Image encode time per image: Kestrel's SigLIP tower + Gemma 3 projector against transformers'.

Both encode the same random-weight Gemma 3 vision tower (built with transformers, saved, and
converted with ``convert_checkpoint``) on the same pixels in one process, after a warm-up each;
the JSON reports median seconds per image and the ratio Kestrel / transformers (this machine is
shared and noisy: only ratios travel). Configurations:

- ``tiny``: the test suite's tower (32 px, 8 px patches, 2 layers, width 24), a batch of 8 images.
- ``gemma3``: Gemma 3's SigLIP-400M at full width and resolution (896 px, 14 px patches, so
  4096 patches; width 1152, MLP 4304, 16 heads) but only ``--gemma-layers`` of its 27 layers, one
  image; the full tower's time is extrapolated per layer (the patch embedding, position
  embeddings and projector run once and are included in the measured time, so the
  extrapolation slightly overstates).
- ``preprocess``: decode + resize + normalise of a 1024x768 JPEG to 896 px, Kestrel's
  ``load_image`` against transformers' Gemma3ImageProcessorPil on the decoded image.

    python bench/vision.py [--runs 3] [--gemma-layers 2] [--out bench/results/vision_cpu.json]
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.common import environment, write_json  # noqa: E402

TEXT = dict(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, head_dim=32, max_position_embeddings=512)


def build(vision: dict, mm_tokens: int, folder: str):
    """A random transformers Gemma 3 VLM (tiny text model) and its Kestrel conversion."""
    import torch
    import transformers

    from model.checkpoint import load_checkpoint
    from model.convert import convert_checkpoint

    config = transformers.Gemma3Config(text_config=TEXT, vision_config={**vision, "vision_use_head": False},
                                       mm_tokens_per_image=mm_tokens, image_token_index=63,
                                       boi_token_index=61, eoi_token_index=62)
    torch.manual_seed(0)
    hf = transformers.Gemma3ForConditionalGeneration(config).to(torch.float32).eval()
    with torch.no_grad():  # the projector starts at zero: random weights make outputs comparable
        for p in hf.parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.02)
    hf.config._attn_implementation = "sdpa"
    hf.save_pretrained(os.path.join(folder, "hf"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert_checkpoint(os.path.join(folder, "hf"), os.path.join(folder, "ckpt"))
    model, _ = load_checkpoint(os.path.join(folder, "ckpt"))
    return hf, model


def median_time(fn, runs: int) -> tuple[float, float]:
    """(first call seconds (compile included), median of ``runs`` further calls)."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def encode_times(vision: dict, mm_tokens: int, batch: int, runs: int, torch_device: str = "cpu") -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from flax import nnx

    with tempfile.TemporaryDirectory() as folder:
        hf, model = build(vision, mm_tokens, folder)
    hf = hf.to(torch_device)
    size = vision["image_size"]
    nchw = np.random.default_rng(0).normal(size=(batch, 3, size, size)).astype(np.float32)
    nchw_torch = torch.from_numpy(nchw).to(torch_device)
    pixels = jnp.asarray(nchw.transpose(0, 2, 3, 1))
    encode = nnx.jit(lambda m, x: m.encode_images(x))

    def kestrel():
        jax.block_until_ready(encode(model, pixels))

    def reference():
        with torch.no_grad():
            hf.model.get_image_features(nchw_torch)
        if torch_device != "cpu":
            torch.cuda.synchronize()

    k_first, k_med = median_time(kestrel, runs)
    t_first, t_med = median_time(reference, runs)
    with torch.no_grad():
        want = hf.model.get_image_features(nchw_torch).pooler_output.cpu().numpy()
    err = float(np.abs(np.asarray(encode(model, pixels)) - want).max())
    return {"batch": batch, "kestrel_s_per_image": k_med / batch, "transformers_s_per_image": t_med / batch,
            "ratio_kestrel_over_transformers": k_med / t_med, "kestrel_first_call_s": k_first,
            "transformers_first_call_s": t_first, "max_abs_diff": err, "vision_config": vision,
            "mm_tokens_per_image": mm_tokens, "transformers_device": torch_device,
            "kestrel_device": str(jax.devices()[0])}


def preprocess_times(runs: int) -> dict:
    import numpy as np
    from PIL import Image
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    from model.image_processing import load_image
    from model.vision_config import VisionConfig

    cfg = VisionConfig(hidden_size=16, intermediate_size=16, num_layers=1, num_heads=1, image_size=896,
                       patch_size=14)
    data = np.random.default_rng(0).integers(0, 256, (768, 1024, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(data).save(buf, format="JPEG", quality=90)
    encoded = buf.getvalue()
    processor = Gemma3ImageProcessorPil(size={"height": 896, "width": 896}, image_mean=[0.5] * 3,
                                        image_std=[0.5] * 3)
    _, k = median_time(lambda: load_image(encoded, cfg), runs)
    _, t = median_time(lambda: processor(Image.open(io.BytesIO(encoded)), return_tensors="np"), runs)
    return {"image": "1024x768 JPEG -> 896x896", "kestrel_s": k, "transformers_s": t,
            "ratio_kestrel_over_transformers": k / t}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--gemma-layers", type=int, default=2)
    parser.add_argument("--gemma-batch", type=int, default=1, help="images per encode call (Gemma 3 size)")
    parser.add_argument("--torch-device", default="cpu", help="where transformers runs (cpu, cuda)")
    parser.add_argument("--skip-preprocess", action="store_true")
    parser.add_argument("--out", default="bench/results/vision_cpu.json")
    args = parser.parse_args()
    import torch

    tiny = dict(hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                image_size=32, patch_size=8)
    gemma = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=args.gemma_layers,
                 num_attention_heads=16, image_size=896, patch_size=14)
    results = {"tiny": encode_times(tiny, 4, 8, args.runs, args.torch_device)}
    print("tiny", results["tiny"], flush=True)
    g = encode_times(gemma, 256, args.gemma_batch, args.runs, args.torch_device)
    per_layer = 27 / args.gemma_layers
    g["layers_measured"] = args.gemma_layers
    g["kestrel_s_per_image_27_layers_extrapolated"] = g["kestrel_s_per_image"] * per_layer
    g["transformers_s_per_image_27_layers_extrapolated"] = g["transformers_s_per_image"] * per_layer
    results["gemma3_siglip_subset"] = g
    print("gemma3", g, flush=True)
    if not args.skip_preprocess:
        results["preprocess"] = preprocess_times(args.runs)
        print("preprocess", results["preprocess"], flush=True)
    note = "shared 2-core CPU" if args.torch_device == "cpu" else "both on the GPU"
    payload = {"benchmark": "vision encode time per image", "machine_note": note,
               "torch_threads": torch.get_num_threads(), "environment": environment(), "results": results}
    print(write_json(args.out, payload))


if __name__ == "__main__":
    main()

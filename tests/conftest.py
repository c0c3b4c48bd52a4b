"""Test environment, set before JAX is imported: CPU with 8 simulated devices, hub offline."""

import os

if not os.environ.get("KESTREL_TEST_GPU"):
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The files that take longest on the 2-core CPU (measured, longest first). xdist's --dist loadfile
# queue otherwise runs files with the most tests first, which puts the few-test, long files (the
# SmolLM2 end-to-end test, the served-process test) last, where one of them runs alone on one
# worker while the other sits idle. Starting the long files first lets the short ones fill in.
LONGEST_FILES = (
    "tests/test_smollm2.py",
    "tests/model/test_model.py",
    "tests/serve/test_engine.py",
    "tests/serve/test_engine_images.py",
    "tests/serve/test_runner.py",
    "tests/api/test_grpc_stream.py",
    "tests/api/test_grpc_errors.py",
    "tests/api/test_speculative_api.py",
    "tests/api/test_serve_process.py",
    "tests/model/test_quantization.py",
    "tests/train/test_eval.py",
    "tests/model/test_vision.py",
    "tests/kernels/test_paged_attention.py",
    "tests/model/test_tokenizer.py",
    "tests/model/test_generate.py",
    "tests/serve/test_batch.py",
    "tests/train/test_nano_export.py",
)


def pytest_configure(config):
    # Keep the collection order below instead of xdist's tests-per-file order (option absent
    # without xdist).
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    """Longest files first (in LONGEST_FILES order), then the rest by number of tests, most first,
    as xdist would; the order inside a file is kept, so module fixtures are still built once."""
    rank = {path: i for i, path in enumerate(LONGEST_FILES)}
    counts: dict[str, int] = {}
    for item in items:
        counts[item.nodeid.split("::")[0]] = counts.get(item.nodeid.split("::")[0], 0) + 1
    first_seen = {path: i for i, path in enumerate(dict.fromkeys(counts))}

    def key(item):
        path = item.nodeid.split("::")[0]
        return (rank.get(path, len(rank)), -counts[path], first_seen[path])

    items.sort(key=key)  # stable: a file's own order survives

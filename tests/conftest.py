"""Test environment, set before JAX is imported: CPU with 8 simulated devices, hub offline."""

import os
import pathlib

if not os.environ.get("KESTREL_TEST_GPU"):
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        flags = (flags + " --xla_force_host_platform_device_count=8").strip()
    # The suite's programs are tiny models run a few times: compiling them is most of a cold run
    # (a fresh clone, CI), so the CPU backend's code optimisation is turned down; the whole suite
    # passes with it as without (1,013 passed, 2 skipped, 2026-12-02). Measured cold on the 2-core CPU
    # (2026-12-02): test_model + test_runner + test_eval 248 s -> 179 s; the SmolLM2 end-to-end,
    # long-context and vision-training files, which compute more, 131 s -> 122 s.
    if "xla_backend_optimization_level" not in flags:
        flags += " --xla_backend_optimization_level=0"
    os.environ["XLA_FLAGS"] = flags
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One thread per worker for torch (the transformers references) and BLAS: the two xdist workers
# already fill the two cores, and OpenMP threads that spin while the other worker holds a core
# made the SmolLM2 reference generation ten times slower (141 s against 14 s, measured).
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Compilation is most of the suite's time, and the same XLA programs recur across test files (the
# shared tiny models) and across the xdist workers. A persistent compilation cache compiles each
# once: a cold cache (a fresh clone) saves the repeats within the run, a warm one (a checkout
# tested before) most of the compiling. Entries are keyed by the program and the JAX version, so a
# changed model misses instead of reusing a stale binary. It lives in the checkout's ignored
# .cache/, bounded in size (least recently used entries go first).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      str(pathlib.Path(__file__).resolve().parents[1] / ".cache" / "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(2 << 30))

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

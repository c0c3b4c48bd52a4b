"""Regenerates the Python stubs of Kestrel's protos: ``python protos/generate.py [--out DIR]``.

Runs ``python -m grpc_tools.protoc`` from the repository root with ``-I .`` on
``protos/kestrel/v1/*.proto``, so the generated modules are named after their path
(``protos.kestrel.v1.kestrel_pb2``) and import one another that way: they work from a checkout and
from an installed package alike. Writes ``*_pb2.py``, ``*_pb2.pyi`` (types for editors and
checkers) and ``*_pb2_grpc.py`` beside each ``.proto``, or under ``--out`` (a test regenerates into
a temporary directory and compares, so the committed stubs cannot drift from the protos or be
edited by hand).

The stubs record the grpcio-tools version that made them; regenerate after upgrading it.
"""

from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_DIR = pathlib.PurePosixPath("protos/kestrel/v1")


def proto_files(root: pathlib.Path = REPO_ROOT) -> list[str]:
    """The ``.proto`` files, as paths relative to ``root`` (the names protoc records)."""
    return sorted(p.relative_to(root).as_posix() for p in (root / PROTO_DIR).glob("*.proto"))


def generated_files(root: pathlib.Path = REPO_ROOT) -> list[str]:
    """The stub files generation writes, relative to the output directory."""
    out = []
    for proto in proto_files(root):
        stem = proto.removesuffix(".proto")
        out += [f"{stem}_pb2.py", f"{stem}_pb2.pyi", f"{stem}_pb2_grpc.py"]
    return out


def generate(out_dir: pathlib.Path = REPO_ROOT) -> list[pathlib.Path]:
    """Runs protoc on every proto and returns the paths of the files it wrote.

    Args:
        out_dir: root of the output tree; files land at ``out_dir/protos/kestrel/v1/``.

    Raises:
        RuntimeError: protoc failed (its messages are included).
    """
    out_dir = pathlib.Path(out_dir).resolve()
    protos = proto_files()
    if not protos:
        raise RuntimeError(f"no .proto files under {REPO_ROOT / PROTO_DIR}")
    (out_dir / PROTO_DIR).mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "grpc_tools.protoc", "-I", ".",
           f"--python_out={out_dir}", f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}", *protos]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"protoc failed ({proc.returncode}):\n{proc.stderr}")
    return [out_dir / f for f in generated_files()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=REPO_ROOT,
                        help="output root (default: the repository, beside the protos)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Generate the Python gRPC code for every .proto under protos/.

Used by setup.py at build time and by the staleness test, so the two can never
disagree about how the code is generated. Standalone on purpose: it runs before
the package is installed.
"""
from __future__ import annotations

from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent


def proto_files(root: Path = PROTO_ROOT) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.proto"))


def generated_names(proto: str) -> list[str]:
    stem = proto[: -len(".proto")]
    return [f"{stem}_pb2.py", f"{stem}_pb2.pyi", f"{stem}_pb2_grpc.py"]


def generate(out_dir: Path = PROTO_ROOT, root: Path = PROTO_ROOT) -> list[Path]:
    """Run protoc (from grpcio-tools) over every .proto; return the generated files."""
    import grpc_tools
    from grpc_tools import protoc

    protos = proto_files(root)
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = ["protoc", f"-I{root}", f"-I{well_known}", f"--python_out={out_dir}",
            f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}", *protos]
    if protos and protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed for {protos}")
    return [Path(out_dir) / name for proto in protos for name in generated_names(proto)]


if __name__ == "__main__":
    for path in generate():
        print(path)

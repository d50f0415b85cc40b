"""Build hooks: map the fixed repository layout onto the `vidsearch` import namespace
and generate the gRPC Python code from protos/ at build time (never committed)."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def generate_protos() -> None:
    spec = importlib.util.spec_from_file_location("vidsearch_codegen", ROOT / "protos" / "codegen.py")
    codegen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(codegen)
    codegen.generate()


def find_packages_under(prefix: str, directory: str) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(ROOT / directory):
        dirnames[:] = [d for d in dirnames if not d.startswith((".", "__"))]
        if "__init__.py" in filenames:
            rel = Path(dirpath).relative_to(ROOT / directory)
            found.append(".".join([prefix, *rel.parts]) if rel.parts else prefix)
    return found


class BuildPyWithProtos(build_py):
    def run(self) -> None:
        generate_protos()
        super().run()


generate_protos()  # also for editable installs, whose finder reads the source tree

setup(
    packages=find_packages_under("vidsearch", "shared")
    + find_packages_under("vidsearch.services", "services")
    + ["vidsearch.v1"],
    cmdclass={"build_py": BuildPyWithProtos},
)

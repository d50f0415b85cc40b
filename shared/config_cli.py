"""`vidsearch config`: print the effective, validated settings as YAML."""
from __future__ import annotations

import argparse

import yaml

from vidsearch.config import Settings


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = "Print the effective settings (defaults, file, environment), secrets masked."


def run(args: argparse.Namespace, settings: Settings) -> int:
    print(yaml.safe_dump(settings.dump(), sort_keys=False), end="")
    return 0

"""`vidsearch config`: print the effective settings, or the settings reference table."""
from __future__ import annotations

import argparse

import yaml
from pydantic import BaseModel

from vidsearch.config import ENV_PREFIX, WELL_KNOWN_ENV, Settings


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = "Print the effective settings (defaults < file < environment), secrets masked."
    parser.add_argument("--table", action="store_true",
                        help="print the reference table of every setting (markdown) instead")


def settings_table() -> str:
    """Markdown table of every setting: YAML key, environment variable, default, meaning."""
    aliases = {f"{section}.{key}": name for name, (section, key) in WELL_KNOWN_ENV.items()}
    rows = ["| setting (YAML) | environment | default | meaning |", "|---|---|---|---|"]
    for section, field in Settings.model_fields.items():
        model: type[BaseModel] = field.annotation
        for key, info in model.model_fields.items():
            dotted = f"{section}.{key}"
            env = f"`{ENV_PREFIX}{section.upper()}__{key.upper()}`"
            if dotted in aliases:
                env = f"`{aliases[dotted]}` or {env}"
            default = info.get_default(call_default_factory=True)
            shown = "unset" if default is None else f"`{default}`"
            # A literal '|' would end the markdown cell early.
            meaning = (info.description or "").replace("|", "\\|")
            shown = shown.replace("|", "\\|")
            rows.append(f"| `{dotted}` | {env} | {shown} | {meaning} |")
    return "\n".join(rows) + "\n"


def run(args: argparse.Namespace, settings: Settings) -> int:
    if args.table:
        print(settings_table(), end="")
    else:
        print(yaml.safe_dump(settings.dump(), sort_keys=False), end="")
    return 0

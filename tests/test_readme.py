"""The README is the user's manual: its commands, examples and tables must stay true.

What can run here runs (the CLI lines are parsed by the real argument parser, the
messages by the real message parser, the DLQ example is compared with a real DLQ
record). The live gRPC snippet is executed by the query tests against a running
service (``readme_python_client`` below).
"""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from vidsearch.cli import COMMANDS, build_parser
from vidsearch.config_cli import settings_table
from vidsearch.messages import DeleteOp, UpsertOp, dlq_record, parse_ingest_message

README = Path(__file__).resolve().parents[1] / "README.md"


def readme() -> str:
    return README.read_text(encoding="utf-8")


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", readme(), flags=re.S)


def shell_lines(block: str) -> list[str]:
    """Logical command lines of a bash block: continuations joined, comments dropped."""
    joined = block.replace("\\\n", " ")
    lines = []
    for line in joined.splitlines():
        line = line.split(" # ")[0].strip()
        if line and not line.startswith("#"):
            lines.append(line)
    return lines


def readme_python_client() -> str:
    """The README's Python client snippet (run against a live server by the query tests)."""
    (snippet,) = [b for b in code_blocks("python") if "SearchServiceStub" in b]
    return snippet


def test_quick_start_is_make_demo_then_make_test():
    first = shell_lines(code_blocks("bash")[0])
    assert first[:2] == ["make demo", "make test"]


def test_ci_runs_the_readme_test_command():
    ci = (README.parent / ".ci" / "run").read_text()
    commands = [line.strip() for line in ci.splitlines() if line.strip() and not line.strip().startswith("#")]
    assert "make test" in commands


def test_settings_table_matches_the_code():
    text = readme()
    table = text.split("<!-- settings-table:start -->\n", 1)[1].split("<!-- settings-table:end -->", 1)[0]
    assert table == settings_table(), "README settings table is stale: paste `vidsearch config --table`"


def vidsearch_command_lines() -> list[str]:
    lines = []
    for block in code_blocks("bash"):
        lines += [line for line in shell_lines(block) if line.startswith("vidsearch ")]
    # The commands table names each command with its options.
    for cell in re.findall(r"^\| `(vidsearch [^`]+)` \|", readme(), flags=re.M):
        lines.append(cell)
    return lines


def test_every_documented_command_exists():
    documented = {line.split()[1] for line in vidsearch_command_lines()}
    assert documented <= set(COMMANDS), documented - set(COMMANDS)
    # And every command the CLI has is documented.
    assert set(COMMANDS) <= documented, set(COMMANDS) - documented


@pytest.mark.parametrize("line", [line for line in vidsearch_command_lines() if "[" not in line and "|" not in line])
def test_documented_command_lines_parse(line):
    """Concrete command lines (no [optional] or a|b syntax) parse with the real parser."""
    import importlib

    argv = shlex.split(line)[1:]
    parser, sub = build_parser()
    module = importlib.import_module(COMMANDS[argv[0]][0])
    module.configure(sub.choices[argv[0]])
    parser.parse_args(argv)  # exits (SystemExit) on an unknown option


def test_message_examples_parse():
    (block,) = [b for b in code_blocks("json") if '"op": "upsert"' in b]
    ops = [parse_ingest_message(line.encode()) for line in block.splitlines() if line.strip()]
    assert isinstance(ops[0], UpsertOp) and ops[0].video_id == "abc" and ops[0].metadata["tags"] == ["ball"]
    assert isinstance(ops[1], DeleteOp) and ops[1].video_id == "abc"


def test_kcat_example_produces_a_valid_keyed_message():
    (line,) = [line for block in code_blocks("bash") for line in shell_lines(block) if "kcat" in line]
    echo, kcat = line.split(" | ", 1)
    kcat_args = shlex.split(kcat)
    assert kcat_args[:2] == ["kcat", "-P"] and kcat_args[kcat_args.index("-t") + 1] == "videos.ingest"
    delimiter = kcat_args[kcat_args.index("-K") + 1]
    (payload,) = shlex.split(echo)[1:]
    key, value = payload.split(delimiter, 1)
    op = parse_ingest_message(value.encode(), key.encode())
    assert isinstance(op, UpsertOp) and op.video_id == key


def test_dlq_example_has_the_real_record_fields():
    (block,) = [b for b in code_blocks("json") if '"error_class"' in b]
    example = json.loads(block)
    real = json.loads(dlq_record(b"{}", b"abc", "videos.ingest", 2, 17, "not_allowed", "why"))
    assert set(example) == set(real)
    assert set(example["source"]) == set(real["source"])


def test_documented_error_classes_exist_in_the_code():
    import vidsearch.messages as messages
    import vidsearch.uris as uris

    text = readme()
    section = text.split("Error classes:", 1)[1].split("Transient failures", 1)[0]
    documented = set(re.findall(r"`([a-z_]+)`", section))
    sources = Path(messages.__file__).read_text() + Path(uris.__file__).read_text()
    sources += (README.parent / "services" / "ingest" / "encoder.py").read_text()
    sources += (README.parent / "services" / "ingest" / "pipeline.py").read_text()
    missing = {name for name in documented if f'"{name}"' not in sources}
    assert not missing, missing


def test_documented_metrics_exist():
    from vidsearch.services.ingest.metrics import IngestMetrics

    names = set(re.findall(r"`(vidsearch_ingest_[a-z_]+)", readme()))
    exported = {metric.name for metric in IngestMetrics().registry.collect()}
    # Counters are exported without their _total suffix in the family name.
    assert {n.removesuffix("_total") for n in names} <= exported, names


def test_documented_paths_exist():
    for path in re.findall(r"`((?:deploy|protos|shared|docs|benchmarks|services)/[\w./-]+)`", readme()):
        assert (README.parent / path).exists(), path

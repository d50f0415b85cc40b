"""`vidsearch models list | show VERSION | rollback [--to VERSION]`: the registry's versions."""
from __future__ import annotations

import argparse
import json
from typing import Any

from vidsearch.cli import CommandError
from vidsearch.config import Settings

# The trainer's default gate metric (services/trainer/config.py, publish.gate_metric);
# a manifest that names its own in training.gate_metric / training.publish.gate_metric wins.
DEFAULT_GATE_METRIC = "val.student.R@1"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = "List and inspect the model versions in the registry, and roll production back."
    sub = parser.add_subparsers(dest="models_command", metavar="ACTION")
    sub.required = True
    listing = sub.add_parser("list", help="versions with created_at, parent, frame encoder, gate metric, aliases")
    listing.add_argument("--json", action="store_true", help="one JSON object per version instead of a table")
    listing.add_argument("--no-store", action="store_true", help="don't look up the live store alias")
    show = sub.add_parser("show", help="one version's manifest (JSON)")
    show.add_argument("version", metavar="VERSION", help="a version id or a registry alias (production, previous)")
    back = sub.add_parser("rollback", help="make the previous version live again (parent, or the previous production)")
    back.add_argument("--to", metavar="VERSION", help="roll back to this version instead")
    back.add_argument("--no-progress", action="store_true", help="no progress bars")
    # For a registry the local stack does not manage (a Kubernetes PVC or object store):
    # the chart's ingest workers run it before they start, so the first index is built
    # with the trained model instead of the untrained base.
    sub.add_parser("install-shipped", help="import the trained model shipped in deploy/models as production "
                   "when the registry has no production version (no-op otherwise)")


def run(args: argparse.Namespace, settings: Settings) -> int:
    from vidsearch.registry import RegistryError

    try:
        if args.models_command == "list":
            return _list(args, settings)
        if args.models_command == "show":
            return _show(args, settings)
        if args.models_command == "install-shipped":
            return _install_shipped(settings)
        return _rollback(args, settings)
    except RegistryError as exc:
        raise CommandError(_one_line(exc)) from None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _registry(settings: Settings) -> Any:
    from vidsearch.registry import ModelRegistry

    return ModelRegistry(settings.model.registry_root)


def gate_metric(manifest: Any) -> tuple[str, Any]:
    """(name, value or None) of the metric a version was gated on."""
    training = manifest.training or {}
    publish = training.get("publish") if isinstance(training.get("publish"), dict) else {}
    name = training.get("gate_metric") or publish.get("gate_metric") or DEFAULT_GATE_METRIC
    value: Any = manifest.metrics.get(name)
    if value is None:
        node: Any = manifest.metrics
        for part in str(name).split("."):
            node = node.get(part) if isinstance(node, dict) else None
        value = node
    return str(name), value


def _live(settings: Settings, skip: bool) -> tuple[str | None, str]:
    """(live collection, note). The store is read when it can be without starting
    anything: a Qdrant server, a configured Ray cluster, or Ray already running here."""
    if skip:
        return None, "store not queried (--no-store)"
    import ray

    if not (settings.store.url or settings.ray.address or ray.is_initialized()):
        return None, ("store not queried: the embedded store is reached through Ray; set RAY_ADDRESS "
                      "to the stack's Ray to see the live alias")
    from vidsearch.store import StoreError, open_store

    try:
        with open_store(settings) as store:
            return store.resolve_alias(settings.store.alias), ""
    except StoreError as exc:
        return None, f"store not reachable: {_one_line(exc)}"


def _list(args: argparse.Namespace, settings: Settings) -> int:
    from vidsearch.registry import RegistryError
    from vidsearch.store_schema import model_version_of

    registry = _registry(settings)
    name = settings.model.model_name
    versions = registry.list_versions(name)
    if not versions:
        raise CommandError(f"no versions of model {name!r} in the registry at {settings.model.registry_root} "
                           "(publish one with the trainer first)")
    by_version: dict[str, list[str]] = {}
    for alias, version in registry.list_aliases(name).items():
        by_version.setdefault(version, []).append(alias)
    live, note = _live(settings, args.no_store)
    live_version = None
    if live is not None:
        try:
            live_version = model_version_of(live, settings.store.alias)
        except ValueError:
            live_version = None
    rows = []
    for version in versions:
        try:
            manifest = registry.get_manifest(name, version)
        except RegistryError as exc:
            rows.append({"version": version, "error": _one_line(exc)})
            continue
        metric, value = gate_metric(manifest)
        aliases = sorted(by_version.get(version, []))
        if version == live_version:
            aliases.append(f"{settings.store.alias} (live)")
        rows.append({"version": version, "created_at": manifest.created_at, "parent": manifest.parent,
                     "frame_encoder": manifest.frame_encoder, "gate_metric": metric, "gate_value": value,
                     "aliases": aliases})
    if args.json:
        for row in rows:
            print(json.dumps(row, sort_keys=True))
    else:
        table = [("VERSION", "CREATED (UTC)", "PARENT", "FRAME ENCODER", "GATE", "ALIASES")]
        for row in rows:
            if "error" in row:
                table.append((row["version"], "-", "-", "-", "-", f"unreadable: {row['error']}"))
                continue
            value = row["gate_value"]
            shown = f"{row['gate_metric']}={value:.4g}" if isinstance(value, (int, float)) else "-"
            table.append((row["version"], row["created_at"][:19].replace("T", " "), row["parent"] or "-",
                          row["frame_encoder"], shown, ", ".join(row["aliases"]) or "-"))
        widths = [max(len(r[i]) for r in table) for i in range(len(table[0]) - 1)]
        for r in table:
            print("  ".join(cell.ljust(width) for cell, width in zip(r, widths)) + "  " + r[-1])
    if live is not None and live_version is None:
        print(f"store alias {settings.store.alias} -> {live}")
    elif live is not None and live_version not in versions:
        print(f"store alias {settings.store.alias} -> {live} (not a registry version)")
    elif live is None and note and not args.json:
        print(f"({note})")
    return 0


def _show(args: argparse.Namespace, settings: Settings) -> int:
    manifest = _registry(settings).get_manifest(settings.model.model_name, args.version)
    print(json.dumps(manifest.to_dict(), indent=2, sort_keys=True))
    return 0


def _rollback(args: argparse.Namespace, settings: Settings) -> int:
    from .reindex import ReindexError, rollback

    try:
        report = rollback(settings, args.to, progress=not args.no_progress)
    except ReindexError as exc:
        raise CommandError(str(exc)) from None
    print(f"rolled back {report.previous_version} -> {report.version}")
    print(report.summary())
    return 0


def _install_shipped(settings: Settings) -> int:
    from vidsearch.models.shipped import install_shipped_model, shipped_version

    before = _registry(settings).get_alias(settings.model.model_name, "production")
    version = install_shipped_model(settings)
    if version is None:
        reason = ("model.use_shipped is off" if not settings.model.use_shipped and shipped_version() is not None
                  else "this installation ships no model (deploy/models is missing)")
        raise CommandError(f"no production version in {settings.model.registry_root} and none installed: {reason}")
    state = "already production" if before == version else "installed as production"
    print(f"{version} {state} in {settings.model.registry_root}")
    return 0

"""Training-data sources (synthetic set, MSR-VTT, generic JSONL/CSV) as one record type.

Every source becomes a list of :class:`TrainingVideo`, validated completely before
the trainer decodes a single frame: a bad line, an empty caption, an unknown split,
a missing file or a uri outside the decode allowlist fails at once with a one-line
:class:`TrainingError` naming the file and the line or video, not an hour into a run.

Splits. The synthetic manifest carries its own. MSR-VTT follows CLIP4Clip/TeachCLIP:
train = the videos of ``MSRVTT_train.9k.csv`` with all their sentences from
``MSRVTT_data.json``; test = the 1k-A set, the rows of ``MSRVTT_JSFUSION_test.csv``
(its ``sentence`` column is the caption); MSR-VTT has no val split there, so val is a
``val_frac`` slice of the train videos. JSONL/CSV rows may name a split; rows without
one are train or val by the same slice. The slice is chosen by a hash of the
video_id, so it is stable across runs, machines and dataset orderings.

Uris. Local paths become absolute ``file://`` uris (relative ones resolve against
the data file's directory); other uris (``https://``, ``s3://``) are kept as given.
Each uri must pass ``vidsearch.uris.resolve_uri`` with the decode settings passed in
(see :func:`trusting_dataset_root`); local files must exist. Remote objects are not
probed here (that would need the network); decoding reports them.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Iterator
from urllib.parse import unquote, urlsplit

from vidsearch.config import DecodeSettings
from vidsearch.synth import MANIFEST_NAME, SynthError, load_manifest
from vidsearch.uris import VideoError, resolve_uri

from .errors import TrainingError

SPLITS: tuple[str, ...] = ("train", "val", "test")
SOURCE_KINDS: tuple[str, ...] = ("synth", "msrvtt", "jsonl", "csv")

MSRVTT_JSON = "MSRVTT_data.json"
MSRVTT_TRAIN_CSV = "MSRVTT_train.9k.csv"
MSRVTT_TEST_CSV = "MSRVTT_JSFUSION_test.csv"
MSRVTT_VIDEO_DIRS = ("videos", "MSRVTT_Videos")

# "scheme:" at the start (two letters or more: one letter is a Windows drive).
_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")


@dataclass(frozen=True)
class TrainingVideo:
    """One video and its captions, whatever source it came from."""

    video_id: str
    uri: str  # absolute file:// uri for local files, else the uri the source gives
    captions: tuple[str, ...]  # at least one, stripped, in source order
    split: str  # one of SPLITS
    # Synthetic set only. Not hashed (dicts aren't hashable) but still compared.
    events: tuple[dict, ...] = field(default=(), hash=False)  # {"phrase", "start_s", "end_s", ...}
    hard_negatives: tuple[dict, ...] = field(default=(), hash=False)  # {"video_id", "relation"}
    variant: str = "base"
    metadata: dict = field(default_factory=dict, hash=False, compare=False)


@dataclass(frozen=True)
class DatasetSource:
    """Where training data comes from (the run config's ``data:`` section)."""

    kind: str  # one of SOURCE_KINDS
    path: str  # synth: manifest.jsonl or its dir; msrvtt: dataset root; jsonl/csv: the file
    val_frac: float = 0.1  # val slice for videos without a split (msrvtt, jsonl/csv rows)
    videos_dir: str | None = None  # msrvtt only; relative to the root; default videos/ or MSRVTT_Videos/

    def __post_init__(self) -> None:
        if self.kind not in SOURCE_KINDS:
            raise TrainingError(f"unknown dataset kind {self.kind!r}; expected one of {', '.join(SOURCE_KINDS)}")
        if not 0.0 <= self.val_frac < 1.0:
            raise TrainingError(f"val_frac must be in [0, 1) (got {self.val_frac})")
        if self.videos_dir is not None and self.kind != "msrvtt":
            raise TrainingError(f"videos_dir applies only to msrvtt datasets, not {self.kind}")


# ---------------------------------------------------------------- public API

def load_dataset(source: DatasetSource, decode: DecodeSettings, *, require_files: bool = True) -> list[TrainingVideo]:
    """Read and validate every video of ``source``; uris are checked against ``decode``.

    Raises TrainingError (one line) for the first problem found; nothing is decoded.
    """
    loaders = {"synth": _load_synth, "msrvtt": _load_msrvtt, "jsonl": _load_jsonl, "csv": _load_csv}
    drafts = loaders[source.kind](source)
    # Training from the index's stored frames never opens a video, so files need not exist then.
    return _validate(drafts, decode, Path(source.path), require_files)


def split_videos(videos: Iterable[TrainingVideo], split: str) -> list[TrainingVideo]:
    """The videos of one split, in dataset order."""
    if split not in SPLITS:
        raise TrainingError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    return [v for v in videos if v.split == split]


def data_hash(videos: Iterable[TrainingVideo]) -> str:
    """sha256 hex of the sorted (video_id, uri, captions, split): what the model was trained on."""
    rows = sorted((v.video_id, v.uri, list(v.captions), v.split) for v in videos)
    return hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode()).hexdigest()


def trusting_dataset_root(decode: DecodeSettings, source: DatasetSource) -> DecodeSettings:
    """A copy of ``decode`` that also allows local files under the dataset's own root.

    The operator named this dataset in the run config, so its directory is trusted;
    a row pointing anywhere else still has to be inside the configured allowlist.
    MSR-VTT's videos folder is part of its layout but often a symlink to a bigger
    disk, so where it really points is trusted too.
    """
    roots = [_dataset_root(source)]
    if source.kind == "msrvtt":
        roots += _msrvtt_video_dir_candidates(source)
    prefixes = list(decode.allowed_prefixes)
    for root in roots:
        if str(root.resolve()) not in prefixes:
            prefixes.append(str(root.resolve()))
    schemes = list(decode.allowed_schemes)
    if "file" not in schemes:
        schemes.append("file")
    return decode.model_copy(update={"allowed_prefixes": prefixes, "allowed_schemes": schemes})


# ---------------------------------------------------------------- common checks

@dataclass
class _Draft:
    """A video while its source is being read; ``origin`` is "file:line" for messages."""

    video_id: str
    uri: str
    captions: list[str]
    split: str | None
    origin: str
    extra: dict[str, Any] = field(default_factory=dict)  # synth: events, hard_negatives, variant, metadata
    derived_id: bool = False  # jsonl/csv: the video_id came from the file stem


def _fail(message: str) -> TrainingError:
    # Names, paths and captions come from user files; keep the message on one line whatever they hold.
    return TrainingError(" ".join(message.splitlines()))


def _clean_caption(caption: Any, where: str) -> str:
    if not isinstance(caption, str):
        raise _fail(f"{where}: caption must be a string, got {type(caption).__name__}")
    if not caption.strip():
        raise _fail(f"{where}: empty caption")
    return caption.strip()


def _check_split(split: Any, where: str) -> str | None:
    if isinstance(split, str):
        split = split.strip()
    if split is None or split == "":
        return None
    if split not in SPLITS:
        raise _fail(f"{where}: unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    return split


def in_val_slice(video_id: str, val_frac: float) -> bool:
    """Whether an unsplit video goes to val: a hash, so stable whatever the order or machine."""
    digest = hashlib.sha256(video_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_frac


def _validate(drafts: list[_Draft], decode: DecodeSettings, path: Path, require_files: bool = True) -> list[TrainingVideo]:
    videos = []
    seen: dict[str, str] = {}
    for draft in drafts:
        where = f"{draft.origin}: video {draft.video_id}"
        if draft.video_id in seen:
            raise _fail(f"{where}: duplicate video_id (also at {seen[draft.video_id]})")
        seen[draft.video_id] = draft.origin
        if not draft.captions:
            raise _fail(f"{where}: no captions")
        try:
            resolved = resolve_uri(draft.uri, decode)
        except VideoError as exc:
            raise _fail(f"{where}: {exc.reason}") from None
        # Existence only after the allowlist, so errors never reveal files outside it.
        if require_files and resolved.is_local and not os.path.isfile(resolved.location):
            raise _fail(f"{where}: no video file at {resolved.location}")
        videos.append(TrainingVideo(
            video_id=draft.video_id, uri=draft.uri, captions=tuple(draft.captions), split=draft.split,
            events=tuple(draft.extra.get("events", ())), hard_negatives=tuple(draft.extra.get("hard_negatives", ())),
            variant=draft.extra.get("variant", "base"), metadata=dict(draft.extra.get("metadata", {}))))
    if not any(v.split == "train" for v in videos):
        raise _fail(f"{path}: no train videos ({len(videos)} video(s) in total)")
    return videos


def _require_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise _fail(f"{what} {path} not found")


def _local_uri(value: str, base: Path) -> str:
    """A path (absolute, or relative to ``base``) as a file:// uri; a uri with a scheme as given."""
    if _SCHEME_RE.match(value):
        return value
    return (base / os.path.expanduser(value)).resolve().as_uri()


def _stem(uri: str) -> str:
    return PurePosixPath(unquote(urlsplit(uri).path)).stem


def _assign_val(drafts: list[_Draft], val_frac: float) -> None:
    for draft in drafts:
        if draft.split is None:
            draft.split = "val" if in_val_slice(draft.video_id, val_frac) else "train"


# ---------------------------------------------------------------- synth

def _dataset_root(source: DatasetSource) -> Path:
    path = Path(source.path)
    if source.kind == "synth":
        return path if path.is_dir() else path.parent
    if source.kind == "msrvtt":
        return path
    return path.parent


def _load_synth(source: DatasetSource) -> list[_Draft]:
    manifest = Path(source.path)
    if manifest.is_dir():
        manifest = manifest / MANIFEST_NAME
    if not manifest.is_file():
        raise _fail(f"synth manifest {manifest} not found (write one with `vidsearch synth --out DIR`)")
    try:
        records = load_manifest(manifest)
    except SynthError as exc:
        raise _fail(str(exc)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise _fail(f"cannot read synth manifest {manifest}: {getattr(exc, 'strerror', None) or exc}") from None
    drafts = []
    for record in records:
        where = f"{manifest}: video {record.video_id}"
        split = _check_split(record.split, where)
        if split is None:
            raise _fail(f"{where}: no split")
        drafts.append(_Draft(
            video_id=record.video_id, uri=record.uri, split=split, origin=str(manifest),
            captions=[_clean_caption(c, where) for c in record.captions],
            extra={"events": record.events, "hard_negatives": record.hard_negatives, "variant": record.variant,
                   "metadata": {**record.metadata, "family": record.family}}))
    return drafts


# ---------------------------------------------------------------- msrvtt

def _msrvtt_video_dir_candidates(source: DatasetSource) -> list[Path]:
    root = Path(source.path)
    if source.videos_dir is not None:
        return [root / source.videos_dir]  # relative to the root; an absolute path stays as it is
    return [root / name for name in MSRVTT_VIDEO_DIRS]


def _msrvtt_videos_dir(source: DatasetSource, root: Path) -> Path:
    for videos in _msrvtt_video_dir_candidates(source):
        if videos.is_dir():
            return videos
    if source.videos_dir is not None:
        raise _fail(f"msrvtt videos_dir {root / source.videos_dir} not found")
    raise _fail(f"msrvtt dataset {root} has no {' or '.join(MSRVTT_VIDEO_DIRS)} directory (or set videos_dir)")


def _read_csv(path: Path, required: tuple[str, ...]) -> Iterator[tuple[str, dict[str, str]]]:
    """("file:line", row) for each data row; malformed CSV raises TrainingError naming the line."""
    try:
        # utf-8-sig: spreadsheets often save a BOM, which would otherwise join the first column's name.
        with path.open(encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle, strict=True)
            try:
                header = [name.strip() for name in next(reader, [])]
                missing = [c for c in required if c not in header]
                if missing:
                    raise _fail(f"{path}:1: header lacks column(s) {', '.join(missing)} "
                                f"(expected {','.join(required)}, got {','.join(header) or 'an empty file'})")
                for fields in reader:
                    where = f"{path}:{reader.line_num}"
                    if not any(f.strip() for f in fields):
                        continue  # a blank line
                    if len(fields) != len(header):
                        raise _fail(f"{where}: malformed CSV row: {len(fields)} field(s), the header has {len(header)}")
                    yield where, dict(zip(header, fields))
            except csv.Error as exc:
                raise _fail(f"{path}:{reader.line_num}: malformed CSV ({exc})") from None
    except UnicodeDecodeError:
        raise _fail(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise _fail(f"cannot read {path}: {exc.strerror or exc}") from None


def _msrvtt_sentences(path: Path) -> dict[str, list[tuple[str, Any]]]:
    """video_id -> ("file: sentences[i]", caption) in file order, from MSRVTT_data.json.

    Captions are checked only for the videos a split uses (the caller), so a bad
    sentence of an unused video does not stop training."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise _fail(f"{path}:{exc.lineno}: malformed JSON ({exc.msg})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise _fail(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    sentences = data.get("sentences") if isinstance(data, dict) else None
    if not isinstance(sentences, list):
        raise _fail(f"{path}: expected a JSON object with a \"sentences\" list")
    by_video: dict[str, list[tuple[str, Any]]] = {}
    for index, sentence in enumerate(sentences):
        where = f"{path}: sentences[{index}]"
        if not isinstance(sentence, dict) or not isinstance(sentence.get("video_id"), str):
            raise _fail(f"{where}: expected an object with a string \"video_id\"")
        by_video.setdefault(sentence["video_id"], []).append((where, sentence.get("caption")))
    return by_video


def _load_msrvtt(source: DatasetSource) -> list[_Draft]:
    root = Path(source.path)
    if not root.is_dir():
        raise _fail(f"msrvtt dataset directory {root} not found")
    for name in (MSRVTT_JSON, MSRVTT_TRAIN_CSV, MSRVTT_TEST_CSV):
        _require_file(root / name, "msrvtt file")
    videos = _msrvtt_videos_dir(source, root)
    sentences = _msrvtt_sentences(root / MSRVTT_JSON)

    def uri(video_id: str) -> str:
        return (videos / f"{video_id}.mp4").resolve().as_uri()

    train: dict[str, _Draft] = {}
    for where, row in _read_csv(root / MSRVTT_TRAIN_CSV, ("video_id",)):
        video_id = row["video_id"].strip()
        if not video_id:
            raise _fail(f"{where}: empty video_id")
        if video_id in train:
            continue  # listed twice: one video all the same
        if not sentences.get(video_id):
            raise _fail(f"{where}: video {video_id}: no captions (no sentences in {MSRVTT_JSON})")
        captions = [_clean_caption(c, f"{at}: video {video_id}") for at, c in sentences[video_id]]
        train[video_id] = _Draft(video_id, uri(video_id), captions, None, where)
    _assign_val(list(train.values()), source.val_frac)

    test: dict[str, _Draft] = {}
    for where, row in _read_csv(root / MSRVTT_TEST_CSV, ("video_id", "sentence")):
        video_id = row["video_id"].strip()
        if not video_id:
            raise _fail(f"{where}: empty video_id")
        if video_id in train:
            # Evaluating on a training video would inflate every metric.
            raise _fail(f"{where}: video {video_id} is in both {MSRVTT_TRAIN_CSV} and {MSRVTT_TEST_CSV}")
        caption = _clean_caption(row["sentence"], f"{where}: video {video_id}")
        if video_id in test:
            test[video_id].captions.append(caption)
        else:
            test[video_id] = _Draft(video_id, uri(video_id), [caption], "test", where)
    return [*train.values(), *test.values()]


# ---------------------------------------------------------------- jsonl / csv

def _row_draft(row: dict[str, Any], captions: list[str], where: str, base: Path) -> _Draft:
    """One row as a draft; the video_id is derived from the file stem when the row has none."""
    raw_uri = row.get("uri")
    if not isinstance(raw_uri, str) or not raw_uri.strip():
        raise _fail(f"{where}: missing \"uri\"")
    uri = _local_uri(raw_uri.strip(), base)
    video_id = row.get("video_id")
    if video_id is None or video_id == "":
        video_id = _stem(uri)
        if not video_id:
            raise _fail(f"{where}: cannot derive a video_id from uri {raw_uri!r}; give one")
        derived = True
    elif not isinstance(video_id, str) or not video_id.strip():
        raise _fail(f"{where}: video_id must be a non-empty string, got {video_id!r}")
    else:
        video_id, derived = video_id.strip(), False
    return _Draft(video_id, uri, captions, _check_split(row.get("split"), where), where, derived_id=derived)


def _merge(rows: Iterable[_Draft], val_frac: float) -> list[_Draft]:
    """Rows of one video (same video_id, or same uri when none is given) become one video."""
    videos: dict[str, _Draft] = {}
    for row in rows:
        video = videos.get(row.video_id)
        if video is None:
            videos[row.video_id] = row
            continue
        if video.uri != row.uri:
            how = ("the video_id derived from the file stem" if row.derived_id or video.derived_id
                   else "video_id")
            raise _fail(f"{row.origin}: {how} {row.video_id!r} clashes with {video.origin} "
                        f"(a different uri); give each video a unique video_id")
        if row.split is not None and video.split is not None and row.split != video.split:
            raise _fail(f"{row.origin}: video {row.video_id} is in split {row.split!r} here "
                        f"but {video.split!r} at {video.origin}")
        video.split = video.split or row.split
        video.captions.extend(row.captions)
    merged = list(videos.values())
    _assign_val(merged, val_frac)
    return merged


def _require_data_file(path: Path, kind: str) -> None:
    if path.is_dir():
        raise _fail(f"{kind} dataset {path} is a directory; expected the {kind} file")
    _require_file(path, f"{kind} dataset")


def _load_jsonl(source: DatasetSource) -> list[_Draft]:
    path = Path(source.path)
    _require_data_file(path, "jsonl")
    base = path.resolve().parent
    rows = []
    try:
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                where = f"{path}:{number}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise _fail(f"{where}: malformed JSON ({exc.msg})") from None
                if not isinstance(row, dict):
                    raise _fail(f"{where}: expected a JSON object, got {type(row).__name__}")
                captions = [row["caption"]] if "caption" in row else []
                if "captions" in row:
                    if not isinstance(row["captions"], list):
                        raise _fail(f"{where}: \"captions\" must be a list of strings")
                    captions += row["captions"]
                if not captions:
                    raise _fail(f"{where}: no caption (give \"caption\" or \"captions\")")
                rows.append(_row_draft(row, [_clean_caption(c, where) for c in captions], where, base))
    except UnicodeDecodeError:
        raise _fail(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise _fail(f"cannot read {path}: {exc.strerror or exc}") from None
    return _merge(rows, source.val_frac)


def _load_csv(source: DatasetSource) -> list[_Draft]:
    path = Path(source.path)
    _require_data_file(path, "csv")
    base = path.resolve().parent
    rows = [_row_draft(row, [_clean_caption(row["caption"], where)], where, base)
            for where, row in _read_csv(path, ("uri", "caption"))]
    return _merge(rows, source.val_frac)


__all__ = ["SOURCE_KINDS", "SPLITS", "DatasetSource", "TrainingVideo", "data_hash", "in_val_slice", "load_dataset",
           "split_videos", "trusting_dataset_root"]

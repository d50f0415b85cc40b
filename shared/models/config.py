"""Declarative model configs: one JSON file describes a whole video-text model.

Following open_clip's habit, a new variant is a new config (a preset file in
``presets/`` or any JSON path), never a new code path. Configs are validated when
they are read, and every error names the offending field (``head.kind``,
``clip.model_cfg`` ...), so a typo in a preset fails at load time, not mid-build.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

PRESET_DIR = Path(__file__).parent / "presets"

HEAD_KINDS = ("meanP", "seqLSTM", "seqTransf", "afa")
SCORER_KINDS = ("cross", "xclip", "spatial")
SCORER_BASES = ("meanP", "head")


def _require_int(where: str, value: Any, minimum: int) -> None:
    # bool is an int subclass; "layers": true in a JSON file is a mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{where}: must be an integer >= {minimum} (got {value!r})")


def _require_kind(where: str, value: Any, kinds: tuple[str, ...]) -> None:
    if value not in kinds:
        raise ValueError(f"{where}: must be one of {', '.join(kinds)} (got {value!r})")


@dataclass(frozen=True)
class ClipConfig:
    """The open_clip backbone.

    ``name`` is an open_clip model name (``ViT-B-32``) or, with ``model_cfg``, a label
    for an inline open_clip model config (``{"embed_dim", "vision_cfg", "text_cfg"}``).
    ``pretrained`` is an open_clip pretrained tag (``openai``) or a local checkpoint
    path (``.safetensors`` loads without pickle); ``None`` means random init.
    """

    name: str
    pretrained: str | None = None
    model_cfg: dict | None = field(default=None, hash=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"clip.name: must be a non-empty string (got {self.name!r})")
        if self.pretrained is not None and (not isinstance(self.pretrained, str) or not self.pretrained):
            raise ValueError(f"clip.pretrained: must be null or a non-empty string (got {self.pretrained!r})")
        if self.model_cfg is not None:
            if not isinstance(self.model_cfg, dict):
                raise ValueError(f"clip.model_cfg: must be a mapping (got {type(self.model_cfg).__name__})")
            missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in self.model_cfg]
            if missing:
                raise ValueError(f"clip.model_cfg: missing {', '.join(missing)}")
            _require_int("clip.model_cfg.embed_dim", self.model_cfg["embed_dim"], 1)
            for tower in ("vision_cfg", "text_cfg"):
                if not isinstance(self.model_cfg[tower], dict):
                    raise ValueError(f"clip.model_cfg.{tower}: must be a mapping")


@dataclass(frozen=True)
class HeadConfig:
    """The fast video head that turns frame embeddings into one video embedding.

    meanP has no parameters; seqLSTM/seqTransf use ``layers`` (and seqTransf ``heads``)
    for the temporal model; afa runs a seqTransf-style temporal encoder first when
    ``layers`` > 0 (TeachCLIP's student), then attentional frame aggregation.
    ``max_frames`` bounds the frame position embeddings. ``temperature`` is AFA's
    aggregation temperature: it pools with softmax(w / temperature) and reports (and
    is distilled through) softmax(w), as TeachCLIP does with 0.1; 1.0 uses one softmax.
    """

    kind: str = "meanP"
    layers: int = 4
    heads: int = 8
    max_frames: int = 64
    temperature: float = 1.0

    def __post_init__(self) -> None:
        _require_kind("head.kind", self.kind, HEAD_KINDS)
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not 0 < self.temperature <= 10:
            raise ValueError(f"head.temperature: must be a number in (0, 10] (got {self.temperature!r})")
        _require_int("head.layers", self.layers, 1 if self.kind in ("seqLSTM", "seqTransf") else 0)
        _require_int("head.heads", self.heads, 1)
        _require_int("head.max_frames", self.max_frames, 1)


@dataclass(frozen=True)
class ScorerConfig:
    """The slow scorer used for re-ranking and as the distillation teacher.

    ``cross``: CLIP4Clip's tight cross-encoder (``layers``, ``heads``, ``width``;
    width ``None`` = the CLIP embedding width). ``xclip``: X-CLIP multi-grained
    similarity after a temporal transformer over the frames (``layers``, ``heads``;
    it runs at the CLIP embedding width, so ``heads`` must divide it and ``width`` is
    unused). ``max_frames`` bounds the frame position embeddings of either.
    ``base`` (cross only): what the cross-encoder's score is a residual on: ``meanP``,
    the cosine of the sentence and the mean frame (CLIP4Clip), or ``head``, the dual
    encoder's own similarity, so an untrained teacher ranks exactly as recall does and
    training only adds what the joint encoder sees beyond it.

    ``spatial``: a cross-encoder that also reads ``grid x grid`` region tokens per frame
    (the frame tower's spatial map, stored at ingest beside the frames), so it sees
    where things are; its score stands on its own (``base`` does not apply).
    ``region_width`` narrows the region tokens with a fixed projection (``None`` = the
    CLIP embedding width). ``grid`` and ``region_width`` are part of what ingest stores:
    changing them means re-decoding, like a new frame tower.

    ``own_text``: the scorer keeps its own frozen copy of the text tower, so distillation
    can train the student's text tower without moving the teacher's inputs.

    Spatial only, both off by default (the published versions predate them):
    ``motion_tokens`` adds one token per frame, the change of its region tokens since the
    previous frame, so which way a shape moved is one linear read-out away instead of a
    comparison the joint transformer has to discover; ``word_tokens`` adds each text
    token's word embedding (before the text transformer, which merges "left" and "right")
    to its input, and needs ``own_text`` (the tower the embeddings come from).
    """

    kind: str = "cross"
    layers: int = 2
    heads: int = 8
    width: int | None = None
    max_frames: int = 64
    base: str = "meanP"
    grid: int = 0
    region_width: int | None = None
    own_text: bool = False
    motion_tokens: bool = False
    word_tokens: bool = False

    def __post_init__(self) -> None:
        for name in ("own_text", "motion_tokens", "word_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"scorer.{name}: must be true or false (got {getattr(self, name)!r})")
        if (self.motion_tokens or self.word_tokens) and self.kind != "spatial":
            raise ValueError(f"scorer.motion_tokens/word_tokens: only the spatial scorer has them (kind {self.kind!r})")
        if self.word_tokens and not self.own_text:
            raise ValueError("scorer.word_tokens: needs scorer.own_text (the word embeddings come from the "
                             "scorer's own text tower)")
        _require_kind("scorer.kind", self.kind, SCORER_KINDS)
        _require_kind("scorer.base", self.base, SCORER_BASES)
        if self.kind == "spatial":
            _require_int("scorer.grid", self.grid, 1)
            if self.base != "meanP":
                raise ValueError("scorer.base: the spatial scorer's score stands on its own; leave base unset")
        elif self.grid or self.region_width is not None:
            raise ValueError(f"scorer.grid/region_width: only the spatial scorer reads regions (kind {self.kind!r})")
        if self.region_width is not None:
            _require_int("scorer.region_width", self.region_width, 1)
        _require_int("scorer.layers", self.layers, 1)
        _require_int("scorer.heads", self.heads, 1)
        if self.width is not None:
            _require_int("scorer.width", self.width, 1)
        _require_int("scorer.max_frames", self.max_frames, 1)

    @property
    def uses_regions(self) -> bool:
        return self.kind == "spatial"


@dataclass(frozen=True)
class ModelConfig:
    clip: ClipConfig
    head: HeadConfig = HeadConfig()
    scorer: ScorerConfig = ScorerConfig()
    num_frames: int = 12

    def __post_init__(self) -> None:
        _require_int("num_frames", self.num_frames, 1)
        # Position embeddings are learned per index, so a model must be able to see
        # every frame it is configured to sample.
        if self.head.kind != "meanP" and self.num_frames > self.head.max_frames:
            raise ValueError(f"num_frames: {self.num_frames} exceeds head.max_frames={self.head.max_frames}")
        if self.num_frames > self.scorer.max_frames:
            raise ValueError(f"num_frames: {self.num_frames} exceeds scorer.max_frames={self.scorer.max_frames}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelConfig":
        if not isinstance(data, Mapping):
            raise ValueError(f"model config: must be a mapping (got {type(data).__name__})")
        _check_keys("", data, cls)
        if "clip" not in data:
            raise ValueError("clip: missing (the open_clip backbone is required)")
        clip = _section("clip", data["clip"], ClipConfig)
        if "name" not in clip:
            raise ValueError("clip.name: missing (an open_clip model name or a label for clip.model_cfg)")
        return cls(
            clip=ClipConfig(**clip),
            head=HeadConfig(**_section("head", data.get("head", {}), HeadConfig)),
            scorer=ScorerConfig(**_section("scorer", data.get("scorer", {}), ScorerConfig)),
            num_frames=data.get("num_frames", 12),
        )

    def with_pretrained(self, pretrained: str | None) -> "ModelConfig":
        return replace(self, clip=replace(self.clip, pretrained=pretrained))


def _check_keys(prefix: str, data: Mapping[str, Any], cls: type) -> None:
    known = {f.name for f in fields(cls)}
    for key in data:
        if key not in known:
            raise ValueError(f"{prefix}{key}: unknown field (known: {', '.join(sorted(known))})")


def _section(name: str, data: Any, cls: type) -> dict[str, Any]:
    if not isinstance(data, Mapping):
        raise ValueError(f"{name}: must be a mapping (got {type(data).__name__})")
    _check_keys(f"{name}.", data, cls)
    return dict(data)


def config_hash(config: ModelConfig) -> str:
    """sha256 of the canonical JSON of a config: the same config gives the same hash."""
    canonical = json.dumps(config.to_dict(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def load_model_config(preset_or_path: str | Path) -> ModelConfig:
    """Read a preset by name (``tiny``, ``vit-b-32``) or a JSON config file by path."""
    text = str(preset_or_path)
    path = Path(text)
    is_path = text.endswith(".json") or "/" in text or "\\" in text or path.is_file()
    if not is_path:
        path = PRESET_DIR / f"{text}.json"
        if not path.is_file():
            raise ValueError(f"model preset '{text}' not found (presets: {', '.join(list_presets())})")
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise ValueError(f"model config {path}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"model config {path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    try:
        return ModelConfig.from_dict(data)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"model config {path}: {exc}") from None

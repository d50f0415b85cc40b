"""vidsearch.models on real tiny open_clip models: configs, factory, heads, scorers,
checkpoint loading, registry round trips and the serving-model choice."""
from __future__ import annotations

import json

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from vidsearch.config import ModelSettings, Settings
from vidsearch.models import (ModelConfig, TextFeatures, build_model, config_hash, list_presets,
                              load_model_config)
from vidsearch.models.heads import AFAHead, MeanPoolHead, SeqLSTMHead, SeqTransfHead
from vidsearch.models.persist import (BASE_SEED, load_model_version, load_serving_model,
                                      save_model_version)
from vidsearch.models.runtime import autocast, resolve_device
from vidsearch.models.scorers import CrossEncoderScorer, XClipScorer
from vidsearch.models.text import text_token_features
from vidsearch.registry import ModelRegistry

HEAD_PRESETS = {"meanP": "tiny", "seqTransf": "tiny-seqtransf", "seqLSTM": "tiny-seqlstm", "afa": "tiny-afa"}
SCORER_PRESETS = {"cross": "tiny", "xclip": "tiny-xclip"}
TINY_PRESETS = sorted(set(HEAD_PRESETS.values()) | set(SCORER_PRESETS.values()))


def _perturb(model, seed: int = 1) -> None:
    """Move head and scorer weights away from their zero/identity init, so the learned
    paths (temporal transformer, LSTM, AFA MLP, cross-encoder) actually contribute."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in (model.head, model.scorer):
            for p in module.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)


def _trained_like(preset: str, seed: int = 0):
    model = build_model(preset, device="cpu", seed=seed)
    _perturb(model, seed + 1)
    return model


@pytest.fixture(scope="module")
def models():
    return {preset: _trained_like(preset) for preset in TINY_PRESETS}


def _frames(batch: int, length: int, dim: int = 32, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(batch, length, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


def _pad_with_garbage(frames: list[torch.Tensor], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack videos of different lengths, filling the padding with huge values and NaN."""
    dim = frames[0].shape[-1]
    gen = torch.Generator().manual_seed(99)
    out = torch.randn(len(frames), length, dim, generator=gen) * 1e4
    out[:, -1, 0] = float("nan")
    mask = torch.zeros(len(frames), length, dtype=torch.bool)
    for i, f in enumerate(frames):
        out[i, :f.shape[0]] = f
        mask[i, :f.shape[0]] = True
    return out, mask


# ---- configs -------------------------------------------------------------------------
def test_every_preset_loads_and_round_trips():
    assert {"vit-b-32", "vit-b-32-seqtransf", *TINY_PRESETS} <= set(list_presets())
    for preset in list_presets():
        config = load_model_config(preset)
        assert ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
        assert config_hash(config) == config_hash(ModelConfig.from_dict(config.to_dict()))
    assert load_model_config("vit-b-32").head.kind == "meanP"
    assert load_model_config("vit-b-32").scorer.kind == "spatial"  # its own 3x3 region view per frame


def test_config_from_json_path(tmp_path):
    data = load_model_config("tiny").to_dict()
    data["head"]["kind"] = "afa"
    path = tmp_path / "custom.json"
    path.write_text(json.dumps(data))
    assert load_model_config(str(path)).head.kind == "afa"
    assert load_model_config(path).head.kind == "afa"


def _tiny_dict() -> dict:
    return load_model_config("tiny").to_dict()


@pytest.mark.parametrize("edit, field", [
    (lambda d: d.update(extra=1), "extra"),
    (lambda d: d["head"].update(size=3), "head.size"),
    (lambda d: d["head"].update(kind="maxP"), "head.kind"),
    (lambda d: d["scorer"].update(kind="bert"), "scorer.kind"),
    (lambda d: d["scorer"].update(layers=0), "scorer.layers"),
    (lambda d: d["head"].update(heads=True), "head.heads"),
    (lambda d: d["clip"].update(name=""), "clip.name"),
    (lambda d: d["clip"].pop("name"), "clip.name"),
    (lambda d: d["clip"]["model_cfg"].pop("embed_dim"), "clip.model_cfg"),
    (lambda d: d["clip"].update(pretrained=3), "clip.pretrained"),
    (lambda d: d.pop("clip"), "clip"),
    (lambda d: d.update(head="meanP"), "head"),
    (lambda d: d.update(num_frames=0), "num_frames"),
    (lambda d: d.update(num_frames=40), "num_frames"),
])
def test_invalid_config_names_the_field(edit, field):
    data = _tiny_dict()
    edit(data)
    with pytest.raises(ValueError, match=rf"^{field}[.:]?"):
        ModelConfig.from_dict(data)


def test_load_model_config_errors(tmp_path):
    with pytest.raises(ValueError, match="preset 'nope' not found.*tiny"):
        load_model_config("nope")
    with pytest.raises(ValueError, match="not valid JSON"):
        (tmp_path / "bad.json").write_text("{")
        load_model_config(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="missing.json"):
        load_model_config(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="head.kind"):
        data = _tiny_dict()
        data["head"]["kind"] = "x"
        (tmp_path / "kind.json").write_text(json.dumps(data))
        load_model_config(tmp_path / "kind.json")


# ---- factory -------------------------------------------------------------------------
def test_factory_builds_each_kind_from_config():
    classes = {"meanP": MeanPoolHead, "seqTransf": SeqTransfHead, "seqLSTM": SeqLSTMHead, "afa": AFAHead,
               "cross": CrossEncoderScorer, "xclip": XClipScorer}
    for preset in TINY_PRESETS:
        config = load_model_config(preset)
        model = build_model(config, device="cpu", seed=0)
        assert isinstance(model.head, classes[config.head.kind])
        assert isinstance(model.scorer, classes[config.scorer.kind])
        assert model.embed_dim == 32 and model.image_size == 32 and not model.training
        assert model.frame_encoder_id.startswith("open_clip:tiny@") and model.frame_encoder_id.endswith(":seed:0")


def test_factory_errors(tmp_path):
    tiny = load_model_config("tiny")
    with pytest.raises(ValueError, match="clip.name: unknown open_clip model 'ViT-Nope'"):
        build_model(ModelConfig.from_dict({"clip": {"name": "ViT-Nope"}}), device="cpu")
    with pytest.raises(ValueError, match="clip.pretrained: 'no-such-tag' is neither"):
        build_model(tiny.with_pretrained("no-such-tag"), device="cpu")
    with pytest.raises(ValueError, match="clip.pretrained: checkpoint file .* not found"):
        build_model(tiny.with_pretrained(str(tmp_path / "absent.safetensors")), device="cpu")
    data = _tiny_dict()
    data["head"].update(kind="seqTransf", heads=5)
    with pytest.raises(ValueError, match="head.heads: width 32 is not divisible by 5"):
        build_model(ModelConfig.from_dict(data), device="cpu")
    data = _tiny_dict()
    data["clip"]["model_cfg"]["vision_cfg"]["no_such_option"] = 1
    with pytest.raises(ValueError, match="clip.model_cfg"):
        build_model(ModelConfig.from_dict(data), device="cpu")
    with pytest.raises(ValueError, match="device"):
        build_model(tiny, device="tpu")


def test_vit_b_32_random_init_builds():
    model = build_model("vit-b-32", device="cpu", seed=0)
    assert model.embed_dim == 512 and model.image_size == 224
    assert model.frame_encoder_id == "open_clip:ViT-B-32:seed:0"
    text = model.encode_text(["a dog"])
    assert text.shape == (1, 512)


def test_seeded_builds_are_identical_and_leave_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = build_model("tiny-afa", device="cpu", seed=7)
    assert torch.equal(torch.rand(3), expected_next)
    b = build_model("tiny-afa", device="cpu", seed=7)
    c = build_model("tiny-afa", device="cpu", seed=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert a.frame_encoder_id == b.frame_encoder_id != c.frame_encoder_id
    unseeded = {build_model("tiny", device="cpu").frame_encoder_id for _ in range(2)}
    assert len(unseeded) == 2  # random weights never share an id


def test_local_safetensors_checkpoint_loads_without_pickle(tmp_path, monkeypatch):
    original = build_model("tiny", device="cpu", seed=3)
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in original.clip.state_dict().items()}, str(path))

    def no_pickle(*args, **kwargs):
        raise AssertionError("torch.load (pickle) must not be used for .safetensors")

    monkeypatch.setattr(torch, "load", no_pickle)
    loaded = build_model(load_model_config("tiny").with_pretrained(str(path)), device="cpu", seed=11)
    assert loaded.frame_encoder_id.startswith("open_clip:tiny@") and ":sha256:" in loaded.frame_encoder_id
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(loaded.encode_frames(pixels), original.encode_frames(pixels))
        assert torch.equal(loaded.encode_text(["a red car"]), original.encode_text(["a red car"]))
    # A checkpoint of another architecture is refused, naming the setting.
    data = _tiny_dict()
    data["clip"]["model_cfg"]["embed_dim"] = 16
    with pytest.raises(ValueError, match="clip.pretrained: checkpoint .* does not fit"):
        build_model(ModelConfig.from_dict(data).with_pretrained(str(path)), device="cpu")


# ---- frames and text -----------------------------------------------------------------
@pytest.mark.parametrize("height, width", [(48, 64), (64, 48), (20, 30), (32, 32)])
def test_preprocess_matches_open_clip_transform(models, height, width):
    model = models["tiny"]
    frames = np.random.default_rng(0).integers(0, 256, size=(2, height, width, 3), dtype=np.uint8)
    pixels = model.preprocess(frames)
    assert pixels.shape == (2, 3, 32, 32) and pixels.dtype == torch.float32
    reference_transform = open_clip.image_transform(32, is_train=False)
    reference = torch.stack([reference_transform(Image.fromarray(f)) for f in frames])
    # Same sizes and crop offsets as open_clip's PIL pipeline; PIL rounds to uint8 after
    # resizing and its bicubic kernel differs slightly, hence not bit-exact.
    assert (pixels - reference).abs().mean() < 0.01
    assert (pixels - reference).abs().max() < 0.25


@pytest.mark.parametrize("bad", [np.zeros((2, 8, 8, 3), np.float32), np.zeros((8, 8, 3), np.uint8),
                                 np.zeros((0, 8, 8, 3), np.uint8), np.zeros((1, 8, 8, 4), np.uint8), [1, 2]])
def test_preprocess_rejects_bad_frames(models, bad):
    with pytest.raises(ValueError, match="frames"):
        models["tiny"].preprocess(bad)


def test_encode_frames_and_text_are_normalised(models):
    model = models["tiny"]
    with torch.inference_mode():
        frames = model.encode_frames(model.preprocess(np.full((4, 20, 30, 3), 128, np.uint8)))
        text = model.encode_text(["a dog", "two cats on a sofa"])
    assert frames.shape == (4, 32) and text.shape == (2, 32)
    assert torch.allclose(frames.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert torch.allclose(text.norm(dim=-1), torch.ones(2), atol=1e-5)
    with pytest.raises(ValueError, match="pixels"):
        model.encode_frames(torch.zeros(2, 32, 32))
    for bad in ([], "a dog", [1]):
        with pytest.raises(ValueError, match="texts"):
            model.encode_text(bad)


def test_token_features_agree_with_open_clip(models):
    model = models["tiny"]
    texts = ["a dog", "a much longer sentence about a person riding a bicycle"]
    with torch.inference_mode():
        features = model.encode_text_features(texts)
        pooled = model.encode_text(texts)
        alone = text_token_features(model.clip, model.tokenize(texts[:1]))
    assert isinstance(features, TextFeatures)
    assert features.tokens.shape[:2] == features.mask.shape and features.tokens.shape[-1] == 32
    assert features.mask.sum(dim=1).tolist()[0] < features.mask.sum(dim=1).tolist()[1]
    assert torch.allclose(features.sentence, pooled, atol=1e-5)
    valid = features.mask[0]
    assert torch.allclose(features.tokens[0, valid], alone.tokens[0], atol=1e-5)
    assert torch.equal(features.tokens[0, ~valid], torch.zeros_like(features.tokens[0, ~valid]))


# ---- heads ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(HEAD_PRESETS))
def test_head_shapes_normalisation_and_weights(models, kind):
    model = models[HEAD_PRESETS[kind]]
    frames, mask = _pad_with_garbage([_frames(1, 5)[0], _frames(1, 2, seed=1)[0]], 6)
    with torch.inference_mode():
        video, weights = model.aggregate_with_weights(frames, mask)
        assert torch.equal(model.aggregate(frames, mask), video)
    assert video.shape == (2, 32) and weights.shape == (2, 6)
    assert torch.allclose(video.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert torch.allclose(weights.sum(dim=1), torch.ones(2), atol=1e-5)
    assert torch.equal(weights[~mask], torch.zeros(int((~mask).sum())))
    if kind == "afa":
        assert not torch.allclose(weights[0, :5], torch.full((5,), 0.2))  # learned, not uniform


def test_meanp_is_the_mean_of_normalised_frames(models):
    raw = torch.randn(2, 4, 32, generator=torch.Generator().manual_seed(5)) * 3
    mask = torch.tensor([[True, True, True, True], [True, True, False, False]])
    with torch.inference_mode():
        video = models["tiny"].aggregate(raw, mask)
    unit = F.normalize(raw, dim=-1)
    expected = F.normalize(torch.stack([unit[0].mean(0), unit[1, :2].mean(0)]), dim=-1)
    assert torch.allclose(video, expected, atol=1e-6)


@pytest.mark.parametrize("preset", ["tiny-seqtransf", "tiny-seqlstm", "tiny-afa"])
def test_untrained_heads_start_as_meanp(preset):
    model = build_model(preset, device="cpu", seed=0)
    meanp = build_model("tiny", device="cpu", seed=0)
    frames, mask = _pad_with_garbage([_frames(1, 4)[0], _frames(1, 3, seed=2)[0]], 4)
    with torch.inference_mode():
        assert torch.allclose(model.aggregate(frames, mask), meanp.aggregate(frames, mask), atol=1e-6)


@pytest.mark.parametrize("kind", sorted(HEAD_PRESETS))
def test_head_padding_is_exact(models, kind):
    model = models[HEAD_PRESETS[kind]]
    videos = [_frames(1, n, seed=n)[0] for n in (7, 3, 1)]
    padded, mask = _pad_with_garbage(videos, 8)
    with torch.inference_mode():
        batch_video, batch_weights = model.aggregate_with_weights(padded, mask)
        for i, video in enumerate(videos):
            alone, alone_weights = model.aggregate_with_weights(video[None], torch.ones(1, len(video), dtype=torch.bool))
            assert torch.allclose(batch_video[i], alone[0], atol=1e-5), i
            assert torch.allclose(batch_weights[i, :len(video)], alone_weights[0], atol=1e-5), i
        # Padding in the middle (any mask pattern) is as exact as trailing padding.
        holes = torch.tensor([[True, False, True, False, True, True, False, False]])
        scattered = torch.randn(1, 8, 32) * 1e4
        scattered[0, holes[0]] = _frames(1, 4, seed=4)[0]
        compact = _frames(1, 4, seed=4)
        assert torch.allclose(model.aggregate(scattered, holes),
                              model.aggregate(compact, torch.ones(1, 4, dtype=torch.bool)), atol=1e-5)


def test_heads_reject_bad_masks(models):
    model = models["tiny-seqtransf"]
    frames = _frames(2, 3)
    with pytest.raises(ValueError, match="at least one valid frame"):
        model.aggregate(frames, torch.tensor([[True, True, True], [False, False, False]]))
    with pytest.raises(ValueError, match="mask: expected shape"):
        model.aggregate(frames, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="embed_dim"):
        model.aggregate(torch.zeros(2, 3, 16), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="max_frames"):
        model.aggregate(_frames(1, 17), torch.ones(1, 17, dtype=torch.bool))
    with pytest.raises(ValueError, match="batch is empty"):
        model.aggregate(torch.zeros(0, 3, 32), torch.zeros(0, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="batch is empty"):
        model.score_query("a dog", torch.zeros(0, 3, 32), torch.zeros(0, 3, dtype=torch.bool))


# ---- scorers -------------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(SCORER_PRESETS))
def test_score_query_shapes_and_text_sensitivity(models, kind):
    model = models[SCORER_PRESETS[kind]]
    frames, mask = _pad_with_garbage([_frames(1, n, seed=n)[0] for n in (4, 2, 3)], 5)
    with torch.inference_mode():
        scores, relevance = model.score_query("a dog runs on the beach", frames, mask)
        other, _ = model.score_query("a bowl of soup", frames, mask)
    assert scores.shape == (3,) and relevance.shape == (3, 5)
    assert torch.isfinite(scores).all()
    assert torch.allclose(relevance.sum(dim=1), torch.ones(3), atol=1e-5)
    assert torch.equal(relevance[~mask], torch.zeros(int((~mask).sum())))
    assert not torch.allclose(scores, other)


@pytest.mark.parametrize("kind", sorted(SCORER_PRESETS))
def test_scorer_padding_is_exact(models, kind):
    model = models[SCORER_PRESETS[kind]]
    texts = ["a man cooks pasta in a small kitchen at night", "dog", "a red car"]
    videos = [_frames(1, n, seed=10 + n)[0] for n in (6, 1, 3)]
    padded, mask = _pad_with_garbage(videos, 7)
    with torch.inference_mode():
        scores, relevance = model.score_pairs(texts, padded, mask)
        for i, (text, video) in enumerate(zip(texts, videos)):
            alone, alone_rel = model.score_pairs([text], video[None], torch.ones(1, len(video), dtype=torch.bool))
            assert torch.allclose(scores[i], alone[0], atol=1e-5), i
            assert torch.allclose(relevance[i, :len(video)], alone_rel[0], atol=1e-5), i


@pytest.mark.parametrize("kind", sorted(SCORER_PRESETS))
def test_score_matrix_is_all_pairs(models, kind):
    model = models[SCORER_PRESETS[kind]]
    texts = ["a dog", "a cat on a mat", "fireworks"]
    frames, mask = _pad_with_garbage([_frames(1, n, seed=20 + n)[0] for n in (4, 2)], 4)
    with torch.inference_mode():
        matrix, relevance = model.score_matrix(texts, frames, mask, pair_chunk=4)
        features = model.encode_text_features(texts)
        again, _ = model.score_matrix(features, frames, mask)
        for t, text in enumerate(texts):
            row, row_rel = model.score_query(text, frames, mask)
            assert torch.allclose(matrix[t], row, atol=1e-5)
            assert torch.allclose(relevance[t], row_rel, atol=1e-5)
    assert matrix.shape == (3, 2) and relevance.shape == (3, 2, 4)
    assert torch.allclose(again, matrix, atol=1e-5)


def test_scorer_is_differentiable_as_teacher(models):
    model = _trained_like("tiny")
    model.train()
    frames = _frames(2, 3).requires_grad_(False)
    matrix, relevance = model.score_matrix(["a dog", "a cat"], frames, torch.ones(2, 3, dtype=torch.bool))
    (matrix.sum() + relevance[..., 0].sum()).backward()
    assert model.scorer.score_head.weight.grad is not None
    assert model.scorer.score_head.weight.grad.abs().sum() > 0


def test_score_pairs_rejects_mismatched_batches(models):
    model = models["tiny"]
    with pytest.raises(ValueError, match="2 texts for 3 videos"):
        model.score_pairs(["a", "b"], _frames(3, 2), torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="text"):
        model.score_query(["a"], _frames(3, 2), torch.ones(3, 2, dtype=torch.bool))


# ---- runtime -------------------------------------------------------------------------
def test_resolve_device_and_autocast():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    for bad in ("tpu", "cuda:x", "", 3):
        with pytest.raises(ValueError, match="device"):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda:0")
    with autocast("cpu"):
        assert not torch.is_autocast_enabled("cpu")


# ---- registry ------------------------------------------------------------------------
def _outputs(model):
    frames, mask = _pad_with_garbage([_frames(1, n, seed=30 + n)[0] for n in (4, 2)], 4)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        return [model.encode_frames(pixels), model.encode_text(["a dog", "a boat"]),
                *model.aggregate_with_weights(frames, mask), *model.score_query("a dog", frames, mask)]


@pytest.mark.parametrize("preset", ["tiny-afa", "tiny-xclip", "tiny-seqlstm"])
def test_registry_round_trip_reproduces_outputs(tmp_path, preset):
    registry = ModelRegistry(str(tmp_path / "registry"))
    model = _trained_like(preset, seed=4)
    version = save_model_version(registry, "vidsearch", model, parent=None,
                                 training={"epochs": 1}, metrics={"r@1": 0.5})
    loaded, manifest = load_model_version(registry, "vidsearch", version, device="cpu")
    assert manifest.version == version and manifest.frame_encoder == model.frame_encoder_id
    assert manifest.architecture == model.config.to_dict() and manifest.metrics == {"r@1": 0.5}
    assert loaded.frame_encoder_id == model.frame_encoder_id and loaded.config == model.config
    for got, want in zip(_outputs(loaded), _outputs(model)):
        assert torch.equal(got, want)


def test_registry_load_rejects_foreign_weights(tmp_path):
    registry = ModelRegistry(str(tmp_path))
    model = build_model("tiny", device="cpu", seed=0)
    tensors = dict(model.state_dict())
    architecture = load_model_config("tiny-afa").to_dict()  # claims an AFA head the weights lack
    version = registry.publish("vidsearch", tensors, {"architecture": architecture,
                                                      "frame_encoder": model.frame_encoder_id})
    with pytest.raises(ValueError, match=rf"vidsearch/{version}: weights do not match"):
        load_model_version(registry, "vidsearch", version, device="cpu")


def test_serving_model_is_production_or_deterministic_base(tmp_path):
    settings = Settings(model=ModelSettings(preset="tiny-xclip", registry_root=str(tmp_path), device="cpu"))
    first, version = load_serving_model(settings)
    second, version_again = load_serving_model(settings)
    assert version == version_again and version.startswith("base-") and len(version) == len("base-") + 8
    assert first.frame_encoder_id.endswith(f":seed:{BASE_SEED}")
    state, state_again = first.state_dict(), second.state_dict()
    assert all(torch.equal(state[k], state_again[k]) for k in state)
    other = Settings(model=ModelSettings(preset="tiny", registry_root=str(tmp_path), device="cpu"))
    assert load_serving_model(other)[1] != version

    registry = ModelRegistry(str(tmp_path))
    trained = _trained_like("tiny-xclip", seed=9)
    published = save_model_version(registry, settings.model.model_name, trained, parent=version)
    registry.set_alias(settings.model.model_name, "production", published)
    served, served_version = load_serving_model(settings)
    assert served_version == published
    for got, want in zip(_outputs(served), _outputs(trained)):
        assert torch.equal(got, want)

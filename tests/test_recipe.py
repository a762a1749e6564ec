"""The training recipe's knobs (issue 11): lateral dropout, view fusion, content-word local loss,
the local-loss ramp, text heads trained during the locked phase, and old checkpoints."""
import json

import numpy as np
import pytest
import torch

from clinvla_engine.config import ConfigError, load_config
from clinvla_engine.losses.objective import local_weight_at, training_losses
from clinvla_engine.model import create_model, load_checkpoint, save_checkpoint
from clinvla_engine.model.checkpoint import DIGEST_KEY, content_digest
from clinvla_engine.model.content_words import content_flags
from clinvla_engine.model.text import Tokenizer, _asset
from clinvla_engine.train import TrainCollate, Trainer, drop_laterals

FUSIONS = ("mean", "gate", "attention")


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """24 two-view studies, all in the training split."""
    from clinvla_engine.data.synth import generate_archive

    out = tmp_path_factory.mktemp("recipe") / "archive"
    generate_archive(out, studies=24, seed=1, fmt="mimic", size=64, lateral_fraction=1.0,
                     split_fractions=(1.0, 0.0, 0.0), progress=False, workers=1)
    return out


def images(b, size, seed):
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def fused_model(fusion, seed=0):
    """The tiny preset with `fusion`, its fusion parameters moved off their (mean-like) init."""
    torch.manual_seed(seed)
    model = create_model({"preset": "tiny", "vision": {"fusion": fusion}})
    with torch.no_grad():
        for p in model.fusion.parameters():
            p.normal_(0, 0.3)
    return model.eval()


# ---- lateral dropout ----------------------------------------------------------------------------
def test_lateral_dropout_drops_present_laterals_at_the_configured_rate():
    present = torch.arange(20000) % 4 != 0  # 75% present
    g = torch.Generator().manual_seed(0)
    kept = drop_laterals(present, 0.3, g)
    assert not kept[~present].any()  # a missing lateral never appears
    rate = 1 - kept[present].float().mean().item()
    assert abs(rate - 0.3) < 0.015, rate
    state = torch.get_rng_state()
    assert torch.equal(drop_laterals(present, 0.0), present)
    assert torch.equal(torch.get_rng_state(), state)  # p = 0 draws nothing: old runs stay bit-identical
    with pytest.raises(ConfigError, match="lateral_dropout"):
        load_config({"preset": "tiny", "train": {"lateral_dropout": 1.0}})


def test_trainer_feeds_the_dropped_laterals_to_the_model(archive, tmp_path):
    cfg = {"preset": "tiny", "train": {"lateral_dropout": 0.5, "batch_size": 16, "center_heads": False,
                                       "augment": False, "save_every": 0}}
    trainer = Trainer(cfg, archive, tmp_path / "run", progress=False)
    trainer.setup()
    trainer.phase_locked = None
    seen = []
    trainer.model.visual.register_forward_pre_hook(lambda mod, args: seen.append(args[1].clone()))
    batch = trainer.collate([trainer.train_set[i] for i in range(16)])
    assert batch["lateral_present"].all()
    torch.manual_seed(0)
    trainer.train_step(batch)
    n_lat = int((seen[-1] == 1).sum())
    assert 2 <= n_lat <= 14, n_lat  # about half of the 16 laterals went through the ViT


# ---- view fusion ----------------------------------------------------------------------------------
def test_gate_weights_sum_to_one_over_present_views_and_ignore_missing_ones():
    model = fused_model("gate")
    b, w = 6, model.config.vision.width
    cls = torch.randn(2 * b, w, generator=torch.Generator().manual_seed(1))
    present = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool)
    static = model.fusion.view_weights(cls, present, b, static_views=True)
    assert torch.allclose(static.sum(1), torch.ones(b))
    assert torch.equal(static[~present], torch.tensor([[1.0, 0.0]] * 2))
    assert (static[present, 1] > 0).all() and not torch.allclose(static[present, 1], torch.full((4,), 0.5))
    # the dynamic path (only the present laterals encoded) gives the same weights
    dynamic = model.fusion.view_weights(torch.cat([cls[:b], cls[b:][present]]), present, b, static_views=False)
    torch.testing.assert_close(dynamic, static)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_a_missing_lateral_gives_the_frontal_only_output_for_every_fusion(fusion):
    model = fused_model(fusion)
    s = model.config.vision.image_size
    frontal, lateral = images(5, s, 2), images(5, s, 3)
    present = torch.tensor([1, 0, 1, 0, 1], dtype=torch.bool)
    with torch.no_grad():
        both = model.encode_images(frontal, lateral, present)
        static = model.encode_images(frontal, lateral, present, static_views=True)
        alone = model.encode_images(frontal[~present])
        mean_model = fused_model("mean")
        mean_model.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("fusion.")})
        as_mean = mean_model.encode_images(frontal, lateral, present)
    torch.testing.assert_close(both[~present], alone, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(static, both, atol=1e-6, rtol=1e-5)
    differs = (both[present] - as_mean[present]).abs().max().item()
    if fusion == "mean":
        assert differs == 0.0
    else:  # the fusion acts where both views are there
        assert differs > 1e-3


@pytest.mark.parametrize("fusion", ["gate", "attention"])
def test_fusions_start_as_the_mean(fusion):
    torch.manual_seed(0)
    model = create_model({"preset": "tiny", "vision": {"fusion": fusion}}).eval()
    mean_model = create_model({"preset": "tiny"}).eval()
    mean_model.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("fusion.")})
    s = model.config.vision.image_size
    args = (images(3, s, 4), images(3, s, 5), torch.tensor([1, 0, 1], dtype=torch.bool))
    with torch.no_grad():
        torch.testing.assert_close(model.encode_images(*args), mean_model.encode_images(*args))


def test_attention_read_out_equals_multi_head_attention_over_projected_tokens():
    """AttentionFusion folds its key/value projections into the query; it must compute what plain
    multi-head attention over kv(LN(tokens)) computes, missing laterals masked, gradients included."""
    from clinvla_engine.model.fusion import AttentionFusion, plain_read_out

    torch.manual_seed(3)
    b, n_patch, width, heads = 5, 7, 48, 4
    fusion = AttentionFusion(width, heads).double()
    with torch.no_grad():
        for p in fusion.parameters():
            p.normal_(0, 0.5)
    present = torch.tensor([True, False, True, True, False])
    cls = torch.randn(2 * b, width, dtype=torch.double, requires_grad=True)  # static: every lateral slot
    patches = torch.randn(2 * b, n_patch, width, dtype=torch.double, requires_grad=True)
    params = [cls, patches] + list(fusion.parameters())
    for views in (2, 1):  # with laterals (masked where missing) and a frontal-only batch (no mask)
        base, keys, keep = fusion.inputs(cls[:views * b], patches[:views * b], present, b, True)
        assert (keep is None) == (views == 1)
        got, want = fusion.read_out(base, keys, keep), plain_read_out(fusion, base, keys, keep)
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-9)
        grads = [torch.autograd.grad(y.square().sum(), params, allow_unused=True, retain_graph=True)
                 for y in (got, want)]
        for a, c in zip(*grads):
            assert (a is None) == (c is None)
            if a is not None:
                torch.testing.assert_close(a, c, atol=1e-9, rtol=1e-8)
    got = fusion(cls, patches, present, b, True)
    # a masked lateral changes nothing: its tokens may hold anything
    junk = cls.detach().clone()
    junk[b + 1] += 100.0
    torch.testing.assert_close(fusion(junk, patches, present, b, True)[1], got[1], atol=1e-10, rtol=0)
    # the dynamic layout (only the present laterals, in batch order) gives the same features
    rows = torch.cat([torch.arange(b), b + present.nonzero().squeeze(1)])
    torch.testing.assert_close(fusion(cls[rows], patches[rows], present, b, False), got, atol=1e-10, rtol=1e-9)


def test_fusion_trains_with_a_frozen_backbone_and_bad_names_are_refused():
    model = create_model({"preset": "tiny", "vision": {"fusion": "attention", "frozen": True}})
    assert all(p.requires_grad for p in model.fusion.parameters())
    with pytest.raises(ConfigError, match="vision.fusion must be one of mean, gate, attention, got 'max'"):
        load_config({"preset": "tiny", "vision": {"fusion": "max"}})


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fusion", ["gate", "attention"])  # "mean": tests/test_export.py's bundle
def test_fused_image_graph_exports_to_onnx_and_matches_eager(fusion):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import onnxruntime as ort

    from clinvla_engine.export.graphs import example_inputs, graph_modules, image_spec
    from clinvla_engine.export.onnx_export import export_raw

    model = fused_model(fusion)
    graph = graph_modules(model)["image"]
    spec = image_spec(model)
    # torch.export (what AOTInductor compiles) is the exporter's first step: this covers both
    proto = export_raw(graph, spec, example_inputs(model, "image", batch=4), opset=18, max_batch=8, max_tokens=48)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    inputs = example_inputs(model, "image", batch=6, seed=7)  # another batch size: the batch is dynamic
    outs = session.run(None, {n: x.numpy() for n, x in zip(spec.input_names, inputs)})
    with torch.no_grad():
        ref = graph(*inputs)
        eager = model.encode_images(inputs[0], inputs[1], inputs[2] > 0.5)  # the skipping (non-static) path
    for got, want in zip(outs, ref):
        np.testing.assert_allclose(got, want.numpy(), atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(outs[0], eager.numpy(), atol=2e-5, rtol=1e-4)


# ---- content words --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def minilm_tokenizer():
    return Tokenizer(_asset("minilm_vocab.txt"), True, 64)


def content_words_of(tok, text):
    ids, _, content = tok([text], content_mask=True)
    pieces = tok._tok.encode(text).tokens
    words, current = [], ""
    for piece, flag in zip(pieces, content[0].tolist()):
        if piece.startswith("##"):
            current += piece[2:]
            assert flag == words[-1][1], f"pieces of one word disagree: {pieces}"
            words[-1] = (current, flag)
        else:
            current = piece
            words.append((piece, flag))
    return [w for w, f in words if f]


@pytest.mark.parametrize("text, expected", [
    ("Small right pleural effusion.", ["small", "right", "pleural", "effusion"]),
    ("No focal consolidation, pleural effusion, or pneumothorax. Moderate cardiomegaly.", ["moderate", "cardiomegaly"]),
    ("The left effusion has resolved, but there is mild cardiomegaly.", ["mild", "cardiomegaly"]),
    ("Negative for pneumothorax; patchy opacity in the right lower lobe.", ["patchy", "opacity", "right", "lower", "lobe"]),
    ("Lungs are free of consolidation. Heart size is normal.", ["lungs", "heart", "size", "normal"]),
    ("No change in the small left effusion, without pneumothorax.", ["small", "left", "effusion"]),
    ("Not only cardiomegaly but also edema.", ["cardiomegaly", "edema"]),
])
def test_content_mask_keeps_content_words_and_drops_negated_ones(minilm_tokenizer, text, expected):
    assert content_words_of(minilm_tokenizer, text) == expected


def test_content_mask_keeps_wordpiece_pieces_together_and_drops_a_truncated_word():
    tok = Tokenizer(_asset("minilm_vocab.txt"), True, 8)
    text = "Small pneumothoraces noted"  # 'pneumothoraces' is 6 pieces: truncation at 8 tokens cuts it
    ids, mask, content = tok([text, "Pneumothoraces."], content_mask=True)
    pieces = tok._tok.encode(text).tokens
    assert pieces[1] == "small" and pieces[2:4] == ["p", "##ne"]
    assert content[0].tolist() == [False, True] + [False] * 6  # the cut word: none of its pieces
    full = Tokenizer(_asset("minilm_vocab.txt"), True, 64)
    _, _, c = full(["Pneumothoraces."], content_mask=True)
    n = len(full._tok.encode("Pneumothoraces.").tokens)
    assert c[0, :n].tolist() == [False] + [True] * (n - 3) + [False, False]  # every piece, not '.' or [SEP]
    assert content.dtype == torch.bool and content.shape == ids.shape and not (content & (mask == 0)).any()


def test_content_flags_handle_post_triggers_and_lists():
    assert content_flags(["effusion", "is", "absent", "."]) == [False, False, False, False]
    assert content_flags(["no", "effusion", ",", "large", "pneumothorax"]) == [False, False, False, True, True]


def test_the_local_loss_sees_only_the_content_words(minilm_tokenizer):
    model = create_model({"preset": "tiny", "text": {"tokenizer": "bundled"}}).train()
    texts = ["No pleural effusion. Small right pneumothorax.", "Moderate cardiomegaly without edema."]
    ids, att, content = model.tokenizer(texts, content_mask=True)
    s = model.config.vision.image_size
    out = model(images(2, s, 1), ids, att, images(2, s, 2), torch.tensor([True, False]),
                loss_word_mask=content[:, 1:])
    assert torch.equal(out.word_mask, content[:, 1:] & model._word_mask(ids, att))
    assert out.word_mask.sum() < model._word_mask(ids, att).sum()
    with pytest.raises(ValueError, match="loss_word_mask must be"):
        model(images(2, s, 1), ids, att, loss_word_mask=content[:1, 1:])
    collate = TrainCollate(model.tokenizer, content=True)
    item = {"frontal": torch.zeros(3, s, s), "lateral": torch.zeros(3, s, s), "lateral_present": torch.tensor(False),
            "labels": torch.zeros(9), "index": torch.tensor(0)}
    batch = collate([{**item, "text": t} for t in texts])
    assert torch.equal(batch["content_mask"], content) and torch.equal(batch["input_ids"], ids)


# ---- the local-loss ramp ----------------------------------------------------------------------------
def test_local_weight_ramp_values():
    cfg = load_config({"preset": "tiny", "loss": {"local_weight": 0.5, "local_start_step": 10,
                                                  "local_ramp_steps": 4}}).loss
    assert [local_weight_at(cfg, s) for s in (0, 9, 10, 11, 12, 13, 14, 100)] == [0, 0, 0.125, 0.25, 0.375, 0.5, 0.5, 0.5]
    cfg.local_start_step = 0
    cfg.local_ramp_steps = 0
    assert local_weight_at(cfg, 0) == 0.5
    with pytest.raises(ConfigError, match="local_ramp_steps must be a whole number >= 0"):
        load_config({"preset": "tiny", "loss": {"local_ramp_steps": -1}})


def test_a_zero_local_weight_step_skips_the_local_loss():
    model = create_model({"preset": "tiny", "loss": {"local_start_step": 5, "mim_weight": 0.0}}).train()
    s = model.config.vision.image_size
    ids, att = model.tokenize(["small right effusion", "moderate cardiomegaly"])
    out = model(images(2, s, 1), ids, att, images(2, s, 2), torch.tensor([True, True]))
    early = training_losses(out, model.config.loss, step=0)
    late = training_losses(out, model.config.loss, step=5)
    assert "local" not in early and early["loss"] == early["global"]
    assert float(late["loss"].detach()) == pytest.approx(float((late["global"] + late["local"]).detach()))


# ---- text heads during the locked phase -------------------------------------------------------------
@pytest.mark.parametrize("heads", [True, False])
def test_text_heads_get_gradients_while_the_tower_is_locked(archive, tmp_path, heads):
    cfg = {"preset": "tiny", "train": {"locked_text_steps": 5, "locked_text_heads": heads, "batch_size": 8,
                                       "save_every": 0}, "loss": {"local_words": "content"}}
    trainer = Trainer(cfg, archive, tmp_path / "run", progress=False)
    trainer.setup()
    trainer.phase_locked = None
    trainer.train_step(trainer.collate([trainer.train_set[i] for i in range(8)]))
    grads = {n: p.grad for n, p in trainer.model.named_parameters()}
    head_grads = [g for n, g in grads.items() if n.startswith(("text_global_head.", "text_local_head."))]
    assert all(g is None for n, g in grads.items() if n.startswith("text."))  # the tower stays locked
    assert grads["visual.cls_token"] is not None
    if heads:
        assert head_grads and all(g is not None and g.abs().sum() > 0 for g in head_grads)
        towers = {g["tower"] for g in trainer.optimizer.param_groups}
        assert towers == {"image", "text", "text_head"}
        assert trainer.scheduler.get_last_lr()[[g["tower"] for g in trainer.optimizer.param_groups].index("text_head")] > 0
    else:
        assert all(g is None for g in head_grads)
    # the cached locked words carry the content mask: fewer words than the real ones
    cls_hidden, words, word_mask = trainer.text_features(trainer.collate([trainer.train_set[i] for i in range(8)]))
    assert word_mask.sum() > 0 and words.shape[-1] == trainer.model.text.width


# ---- old checkpoints -----------------------------------------------------------------------------------
NEW_KEYS = {"vision": ("fusion", "init_from"), "decoder": ("pretrain_mask_ratio", "min_visible"),
            "loss": ("local_words", "local_start_step", "local_ramp_steps"),
            "train": ("locked_text_heads", "lateral_dropout")}


def test_a_checkpoint_written_before_these_keys_loads_with_the_old_recipe(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = create_model("tiny").eval()
    path = save_checkpoint(model, tmp_path / "new")
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        state = {k: f.get_tensor(k) for k in f.keys()}
    config = json.loads(meta["clinvla_config"])
    for section, keys in NEW_KEYS.items():
        for key in keys:
            del config[section][key]
    meta["clinvla_config"] = json.dumps(config)
    meta[DIGEST_KEY] = content_digest(state, meta)
    old = tmp_path / "old.safetensors"
    save_file(state, str(old), metadata=meta)
    loaded = load_checkpoint(old)
    assert loaded.config.vision.fusion == "mean" and loaded.config.loss.local_words == "all"
    assert loaded.config.train.lateral_dropout == 0.0 and loaded.config.vision.init_from is None
    s = model.config.vision.image_size
    args = (images(3, s, 1), images(3, s, 2), torch.tensor([True, False, True]))
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_images(*args), model.encode_images(*args), atol=0, rtol=0)

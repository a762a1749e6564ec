"""`clinvla pretrain` (MAE on the archive's images) and starting a training run from its image tower."""
import json

import pytest
import torch
from safetensors import safe_open

from clinvla_engine.cli import main
from clinvla_engine.config import ConfigError, load_config
from clinvla_engine.model import CheckpointError, create_model, load_checkpoint
from clinvla_engine.model.vit import is_adapter_key
from clinvla_engine.train import STATE_NAME, PretrainTrainer, RunDirectory, mae_visible_tokens


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    from clinvla_engine.data.synth import generate_archive

    out = tmp_path_factory.mktemp("pretrain") / "archive"
    generate_archive(out, studies=32, seed=4, fmt="mimic", size=64, split_fractions=(0.75, 0.25, 0.0),
                     progress=False, workers=1)
    return out


@pytest.fixture(scope="module")
def pretrained(archive, tmp_path_factory):
    """A 3-step tiny pretraining run through the command line."""
    out = tmp_path_factory.mktemp("pt") / "run"
    config = out.parent / "pretrain.json"
    config.write_text(json.dumps({"preset": "tiny", "train": {"eval_every": 3}}))
    assert main(["pretrain", "--archive", str(archive), "--out", str(out), "--config", str(config),
                 "--max-steps", "3", "--quiet"]) == 0
    return out


def test_mask_ratio_is_75_percent_where_the_token_count_allows():
    assert mae_visible_tokens(196, 0.75, 4) == (49, 0.75)
    assert mae_visible_tokens(16, 0.75, 4) == (4, 0.75)
    keep, ratio = mae_visible_tokens(9, 0.75, 4)  # 2 of 9 would stay visible: 4 do
    assert keep == 4 and ratio == pytest.approx(5 / 9)
    assert mae_visible_tokens(4, 0.75, 4) == (3, 0.25)  # at least one patch is always hidden
    with pytest.raises(Exception, match="at least 2 patches"):
        mae_visible_tokens(1, 0.75, 4)
    with pytest.raises(ConfigError, match="pretrain_mask_ratio must be in"):
        load_config({"preset": "tiny", "decoder": {"pretrain_mask_ratio": 1.0}})


def test_pretrain_writes_a_loadable_checkpoint_that_trained_only_the_image_tower(pretrained):
    model = load_checkpoint(pretrained)  # a ClinVLA checkpoint: config, tokenizer, digest
    assert model.decoder is not None
    with safe_open(str(pretrained / "model.safetensors"), framework="pt") as f:
        assert f.metadata()["clinvla_stage"] == "mae-pretrain"
    records = [json.loads(line) for line in (pretrained / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "mim" in r]
    assert [r["step"] for r in steps] == [1, 2, 3] and all(r["mask_ratio"] == 0.75 for r in steps)
    assert all(torch.isfinite(torch.tensor(r["mim"])) for r in steps)
    assert any("val_mim" in r for r in records)
    # the adapters were not trained (their up-projections are still zero), nor were the heads centred
    ups = [p for n, p in model.named_parameters() if n.startswith("visual.") and is_adapter_key(n[7:]) and ".up." in n]
    assert ups and all(torch.count_nonzero(p) == 0 for p in ups)


def test_init_from_loads_the_backbone_and_frozen_freezes_exactly_it(pretrained):
    source = load_checkpoint(pretrained).state_dict()
    for frozen in (True, False):
        model = create_model({"preset": "tiny", "vision": {"init_from": str(pretrained / "model.safetensors"),
                                                           "frozen": frozen}})
        own = model.state_dict()
        backbone = [k for k in own if k.startswith("visual.") and not is_adapter_key(k[7:])]
        assert len(backbone) > 20
        assert [k for k in backbone if not torch.equal(own[k], source[k])] == []  # weights equal
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        visual = [n for n, _ in model.named_parameters() if n.startswith("visual.")]
        if frozen:
            allowed = ("adapter_", "norm", "cls_token", "view_embed")
            assert {n for n in visual if n in trainable} == {n for n in visual if any(a in n for a in allowed)}
            assert "visual.blocks.0.attn.qkv.weight" not in trainable and "visual.pos_embed" not in trainable
            assert "visual.patch_embed.proj.weight" not in trainable and "visual.blocks.1.mlp.fc2.weight" not in trainable
        else:
            assert set(visual) <= trainable
        # outside the backbone everything trains: heads, text side (tiny: text not frozen), temperature
        assert {"image_global_head.fc1.weight", "text_local_head.fc2.weight", "logit_scale"} <= trainable


def test_a_frontal_only_model_starts_from_the_two_view_tower_with_its_frontal_embedding(pretrained):
    # the CLIP baseline (one view) from a pretraining run over both views: claims_study's clip_mae arm
    source = load_checkpoint(pretrained).state_dict()
    assert source["visual.view_embed"].shape[0] == 2
    model = create_model({"preset": "tiny", "vision": {"init_from": str(pretrained / "model.safetensors"),
                                                       "num_views": 1, "frozen": False}})
    own = model.state_dict()
    assert own["visual.view_embed"].shape[0] == 1
    assert torch.equal(own["visual.view_embed"][0], source["visual.view_embed"][0])  # the frontal row
    assert not torch.equal(source["visual.view_embed"][0], source["visual.view_embed"][1])
    backbone = [k for k in own if k.startswith("visual.") and not is_adapter_key(k[7:]) and k != "visual.view_embed"]
    assert len(backbone) > 20 and all(torch.equal(own[k], source[k]) for k in backbone)


def test_a_two_view_model_does_not_start_from_a_one_view_tower(pretrained, tmp_path):
    one_view = create_model({"preset": "tiny", "vision": {"init_from": str(pretrained / "model.safetensors"),
                                                          "num_views": 1, "frozen": False}})
    from clinvla_engine.model import save_checkpoint

    save_checkpoint(one_view, tmp_path / "one")
    with pytest.raises(CheckpointError, match=r"does not fit this model's vision config.*view_embed \(1, "):
        create_model({"preset": "tiny", "vision": {"init_from": str(tmp_path / "one" / "model.safetensors")}})


def test_init_from_refuses_another_architecture_and_a_second_source(pretrained, tmp_path):
    with pytest.raises(CheckpointError, match="does not fit this model's vision config.*width"):
        create_model({"preset": "tiny", "vision": {"init_from": str(pretrained), "width": 32, "heads": 2}})
    with pytest.raises(ConfigError, match="init_from and vision.weights both set"):
        load_config({"preset": "tiny", "vision": {"init_from": "a", "weights": "b"}})
    with pytest.raises(CheckpointError, match="vision.init_from"):
        create_model({"preset": "tiny", "vision": {"init_from": str(tmp_path / "nope.safetensors")}})


class _Stop(RuntimeError):
    pass


def test_pretrain_resumes_exactly_after_a_crash(archive, tmp_path):
    cfg = {"preset": "tiny", "train": {"save_every": 1, "eval_every": 1, "log_every": 1, "warmup_steps": 1}}

    def run(out, resume=False, stop_at=None):
        def evaluate_fn(model, step):  # evaluation comes before the save: a crash here loses step 2's checkpoint
            if step == stop_at:
                raise _Stop(f"killed at step {step}")
            return {}

        trainer = PretrainTrainer(cfg, archive, out, max_steps=3, resume=resume, progress=False,
                                  evaluate_fn=evaluate_fn)
        trainer.setup()
        return trainer.fit()

    run(tmp_path / "straight")
    with pytest.raises(_Stop):
        run(tmp_path / "crashed", stop_at=2)
    assert torch.load(RunDirectory(tmp_path / "crashed").latest() / STATE_NAME, weights_only=True)["step"] == 1
    run(tmp_path / "crashed", resume=True)
    a = load_checkpoint(tmp_path / "straight").state_dict()
    b = load_checkpoint(tmp_path / "crashed").state_dict()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_pretrain_command_errors_are_clear(archive, tmp_path, capsys):
    assert main(["pretrain", "--archive", str(tmp_path / "missing"), "--out", str(tmp_path / "r"),
                 "--config", "tiny", "--max-steps", "1", "--quiet"]) == 2
    assert "clinvla pretrain: error:" in capsys.readouterr().err

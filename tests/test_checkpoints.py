"""SAM checkpoint loading (official key layout) and our safetensors + JSON checkpoints."""
from __future__ import annotations

import json
import shutil
import os
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from usam.models import create_model, load_checkpoint, load_sam_checkpoint, load_weights, save_checkpoint
from usam.models.sam_weights import _resize_pos_embed, _resize_rel_pos
from usam.models.sam_parts import sam_modeling  # noqa: F401  (makes segment_anything importable)


@pytest.fixture(scope="module")
def official_state() -> dict[str, torch.Tensor]:
    """segment-anything's own ViT-B SAM, random weights made non-trivial, as its state dict."""
    from segment_anything.build_sam import build_sam_vit_b

    torch.manual_seed(0)
    sam = build_sam_vit_b()
    with torch.no_grad():
        for p in sam.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return sam.state_dict()


@pytest.fixture(scope="module")
def official_checkpoint(official_state, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sam") / "sam_vit_b_01ec64.pth"
    torch.save(official_state, path)
    return path


@pytest.mark.parametrize("decoder", ["class_tokens", "released"])
def test_usam_b_loads_the_official_layout(official_checkpoint, official_state, decoder):
    model = create_model("usam_b", sam_checkpoint=str(official_checkpoint), decoder=decoder)
    report = model.sam_load_report
    own = model.state_dict()
    assert set(report.resized) == {"image_encoder.pos_embed"} | {
        f"image_encoder.blocks.{i}.attn.rel_pos_{a}" for i in (2, 5, 8, 11) for a in "hw"
    }
    assert own["image_encoder.pos_embed"].shape == (1, 14, 14, 768)
    assert own["image_encoder.blocks.2.attn.rel_pos_h"].shape == (27, 64)
    for key in report.loaded:
        assert torch.equal(own[key], official_state[key]), key
    loaded = set(report.loaded)
    for part in ("image_encoder.blocks.0.", "image_encoder.neck.", "prompt_encoder.", "mask_decoder.transformer."):
        expected = {k for k in official_state if k.startswith(part) and k not in report.resized}
        assert expected and expected <= loaded, part
    assert "image_encoder.patch_embed.proj.weight" in report.skipped
    assert "mask_decoder.mask_tokens.weight" in report.skipped
    assert any(k.startswith("mask_decoder.iou_prediction_head.") for k in report.skipped)
    assert any(k.startswith("mask_decoder.output_upscaling.") for k in report.skipped)
    assert {"mask_decoder.mask_tokens.weight"} <= set(report.new)
    assert any(k.startswith("cnn.") for k in report.new) and any(k.startswith("head.") for k in report.new)
    assert set(report.loaded) | set(report.resized) | set(report.new) == set(own)
    text = str(report)
    assert "resized  image_encoder.pos_embed: [1, 64, 64, 768] -> [1, 14, 14, 768]" in text
    assert "skipped  image_encoder.patch_embed.proj.weight" in text
    mlp = "mask_decoder.output_hypernetworks_mlps.0.layers.0.weight"  # SAM's MLPs have the released ones' shape
    pos_embed = official_state["image_encoder.pos_embed"].permute(0, 3, 1, 2)
    if decoder == "released":  # as the released code's load_from: no decoder head key, pos_embed bilinear
        assert mlp in report.skipped and mlp in report.new and "class_embed" in report.new
        assert model.mask_decoder.num_mask_tokens == 32
        expected = F.interpolate(pos_embed, size=(14, 14), mode="bilinear", align_corners=False)
    else:
        assert mlp in report.loaded and {"class_embed", "head.weight"} <= set(report.new)
        expected = F.interpolate(pos_embed, size=(14, 14), mode="bicubic", align_corners=False, antialias=True)
    torch.testing.assert_close(own["image_encoder.pos_embed"], expected.permute(0, 2, 3, 1))
    with torch.no_grad():
        logits = model.eval()(torch.rand(1, 1, 224, 224))
    assert logits.shape == (1, 3, 224, 224) and torch.isfinite(logits).all()


def test_sam_b_loads_the_patch_embedding_and_upscaling(official_checkpoint, official_state):
    model = create_model("sam_b", num_classes=4, sam_checkpoint=str(official_checkpoint))
    report = model.sam_load_report
    own = model.state_dict()
    for key in ("image_encoder.patch_embed.proj.weight", "mask_decoder.output_upscaling.0.weight",
                "mask_decoder.mask_tokens.weight", "mask_decoder.output_hypernetworks_mlps.3.layers.2.weight"):
        assert key in report.loaded and torch.equal(own[key], official_state[key]), key
    assert report.new == ["class_embed"]


def test_resizing_keeps_the_embeddings_shape_over_space():
    # A smooth field sampled at 64 pixel centres, resized to 14, matches the field at 14 centres.
    def field(n: int) -> torch.Tensor:
        centres = (torch.arange(n) + 0.5) / n
        y, x = torch.meshgrid(centres, centres, indexing="ij")
        return torch.stack([torch.sin(2 * x) + y, x * y], dim=-1)[None]

    torch.testing.assert_close(_resize_pos_embed(field(64), (14, 14)), field(14), atol=0.01, rtol=0)
    # A relative-position table linear in the offset stays linear from the first to the last row.
    table = torch.linspace(-1.0, 1.0, 127)[:, None].repeat(1, 4)
    resized = _resize_rel_pos(table, 27)
    steps = resized[1:, 0] - resized[:-1, 0]
    assert resized.shape == (27, 4) and torch.allclose(resized[:, 0], resized[:, 3])
    assert torch.allclose(steps[1:-1], steps[1:-1].mean(), atol=1e-5) and (steps > 0).all()
    assert -1 < resized[0, 0] < -0.9 and 0.9 < resized[-1, 0] < 1


def test_refuses_files_that_are_not_sam_state_dicts(tmp_path, official_state):
    model = create_model("usam_tiny")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="garbage.pth: not a plain torch state dict"):
        load_sam_checkpoint(model, garbage)

    pickled = tmp_path / "object.pth"
    with open(pickled, "wb") as f:  # an arbitrary object: weights_only must refuse to build it
        pickle.dump({"model": Path("x")}, f, protocol=2)
    with pytest.raises(ValueError, match="object.pth"):
        load_sam_checkpoint(model, pickled)

    other = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.zeros(2)}, other)
    with pytest.raises(ValueError, match="not a SAM checkpoint"):
        load_sam_checkpoint(model, other)

    with pytest.raises(ValueError, match="no such file"):
        load_sam_checkpoint(model, tmp_path / "missing.pth")


def test_refuses_unexpected_shapes_and_missing_parts(tmp_path, official_checkpoint, official_state):
    with pytest.raises(ValueError, match="unexpected shapes.*image_encoder.blocks.0"):
        create_model("usam_tiny", sam_checkpoint=str(official_checkpoint))
    truncated = {k: v for k, v in official_state.items() if not k.startswith("prompt_encoder.")}
    path = tmp_path / "truncated.pth"
    torch.save(truncated, path)
    with pytest.raises(ValueError, match="lacks .* prompt_encoder"):
        create_model("usam_b", sam_checkpoint=str(path))
    with pytest.raises(ValueError, match="no SAM parts"):
        create_model("unet", sam_checkpoint=str(official_checkpoint))


@pytest.mark.parametrize("name", ["usam_tiny", "sam_tiny", "unet"])
def test_checkpoint_round_trip_is_bit_exact(tmp_path, name):
    torch.manual_seed(0)
    kwargs = {
        "usam_tiny": {"skip_connections": 3, "points_per_class": 1},
        "sam_tiny": {"points_per_class": 5},
        "unet": {"base_channels": 32},
    }[name]
    model = create_model(name, num_classes=3, **kwargs)
    model.train()
    model(torch.rand(2, 1, 224, 224))  # moves BatchNorm running statistics off their defaults
    model.eval()
    extra = {"classes": ["background", "rectum", "tumor"], "window": [-160, 240], "seed": 7}
    save_checkpoint(model, tmp_path / "ckpt", extra)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no staging left behind

    loaded, config = load_checkpoint(tmp_path / "ckpt")
    assert config["classes"] == extra["classes"] and config["model"] == model.config
    assert type(loaded) is type(model) and loaded.config == model.config
    before, after = model.state_dict(), loaded.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)
    images = torch.rand(1, 1, 224, 224)
    with torch.no_grad():
        assert torch.equal(model(images), loaded.eval()(images))


def test_overwriting_and_mismatched_models(tmp_path):
    first = create_model("usam_tiny")
    save_checkpoint(first, tmp_path / "ckpt", {"epoch": 1})
    torch.manual_seed(1)
    second = create_model("usam_tiny")
    save_checkpoint(second, tmp_path / "ckpt", {"epoch": 2})
    model, config = load_checkpoint(tmp_path / "ckpt")
    assert config["epoch"] == 2
    assert torch.equal(model.cnn.stem[0].weight, second.cnn.stem[0].weight)

    with pytest.raises(ValueError, match="holds model 'usam_tiny', not 'sam_tiny'"):
        load_weights(create_model("sam_tiny"), tmp_path / "ckpt")
    with pytest.raises(ValueError, match="differs in skip_connections"):
        load_weights(create_model("usam_tiny", skip_connections=1), tmp_path / "ckpt")

    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(first, tmp_path / "other", {"model": "x"})
    with pytest.raises(ValueError, match="JSON"):
        save_checkpoint(first, tmp_path / "other", {"when": object()})
    assert not (tmp_path / "other").exists()

    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text(json.dumps({"format": "something else"}))
    (tmp_path / "broken" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="not a usam-checkpoint config"):
        load_checkpoint(tmp_path / "broken")
    with pytest.raises(ValueError, match="no such folder"):
        load_checkpoint(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="needs config.json"):
        load_checkpoint(tmp_path / "empty")


def test_damaged_weights_and_unknown_models_are_one_line_errors(tmp_path):
    model = create_model("usam_tiny", num_classes=3)
    save_checkpoint(model, tmp_path / "ok")
    weights = (tmp_path / "ok" / "model.safetensors").read_bytes()
    for name, damaged in (("truncated", weights[: len(weights) // 2]), ("garbage", b"\xff" * 64)):
        shutil.copytree(tmp_path / "ok", tmp_path / name)
        (tmp_path / name / "model.safetensors").write_bytes(damaged)
        with pytest.raises(ValueError, match=f"checkpoint {tmp_path / name}: model.safetensors is not a readable"):
            load_checkpoint(tmp_path / name)
    shutil.copytree(tmp_path / "ok", tmp_path / "unknown")
    config = json.loads((tmp_path / "unknown" / "config.json").read_text())
    config["model"]["name"] = "usam_huge"
    (tmp_path / "unknown" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"checkpoint .*unknown: cannot build its model .*usam_huge"):
        load_checkpoint(tmp_path / "unknown")


def test_a_checkpoint_is_replaced_whole_or_not_at_all(tmp_path):
    torch.manual_seed(0)
    first, second = create_model("usam_tiny"), create_model("usam_tiny")
    save_checkpoint(first, tmp_path / "last", {"step": 1}, {"state.pt": lambda path: torch.save({"step": 1}, path)})

    def dies(path):
        raise KeyboardInterrupt  # killed while the new checkpoint is being staged

    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(second, tmp_path / "last", {"step": 2}, {"state.pt": dies})
    model, config = load_checkpoint(tmp_path / "last")
    assert config["step"] == 1 and torch.load(tmp_path / "last" / "state.pt")["step"] == 1
    assert torch.equal(model.cnn.stem[0].weight, first.cnn.stem[0].weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]  # no staging left behind

    save_checkpoint(second, tmp_path / "last", {"step": 2}, {"state.pt": lambda path: torch.save({"step": 2}, path)})
    assert load_checkpoint(tmp_path / "last")[1]["step"] == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["last"]
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "last").stat().st_mode & 0o777 == 0o777 & ~umask  # as readable as a folder made by mkdir
    with pytest.raises(ValueError, match="may not replace"):
        save_checkpoint(second, tmp_path / "last", {}, {"config.json": lambda path: None})



def test_a_checkpoint_written_before_the_recipe_options_loads_as_it_was_trained(tmp_path):
    torch.manual_seed(0)
    model = create_model("usam_tiny")
    save_checkpoint(model, tmp_path / "old")
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    for key in ("prompt_style", "decoder", "head_bias"):
        del config["model"][key]
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    loaded, _ = load_checkpoint(tmp_path / "old")
    assert loaded.config == model.config and loaded.class_embed is not None
    with pytest.raises(ValueError, match="differs in decoder"):
        load_weights(create_model("usam_tiny", decoder="released"), tmp_path / "old")

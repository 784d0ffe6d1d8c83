"""The baselines built on maintained libraries (V-Net, Attention U-Net, TransUNet, Swin-Unet, SAMed): usam fit and
usam eval on demo shards, bit-exact checkpoint reloads, official parameter layouts and pretrained-weight files.

Every system trains at a small input (32 x 32) and, where the architecture has width and depth options, a small
width and depth, so that 2 steps and an evaluation take seconds on a CPU. SAMed trains as `samed_tiny` (SAMed's
code with the ViT of `usam_tiny`): `samed_b` (90 M parameters) and `samed_h` (ViT-H, 636 M) are too heavy for the
suite; `samed_h` is built on the meta device only, for its parameter counts.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from converted_folders import make_converted_folder
from usam.cli import main as usam_main
from usam.models import create_model, load_checkpoint, save_checkpoint
from usam.models.sam_parts import ImageEncoderViT, MaskDecoder, PromptEncoder, TwoWayTransformer
from usam.models.samed import LoRAQKV

SMALL = {
    "vnet": {"img_size": 32},
    "attention_unet": {"img_size": 32, "base_channels": 8},
    "transunet": {"img_size": 32, "resnet_units": [1, 1, 1], "resnet_width": 32, "vit_embed_dim": 64, "vit_depth": 1,
                  "vit_num_heads": 2, "vit_mlp_dim": 128},
    "swin_unet": {"img_size": 32, "embed_dim": 24, "num_heads": [1, 2, 3, 6], "window_size": 4},
    "samed_tiny": {"img_size": 32},
}


def model_arg_flags(args: dict) -> list[str]:
    flags = []
    for key, value in args.items():
        text = "[" + ",".join(map(str, value)) + "]" if isinstance(value, list) else str(value)
        flags += ["--model-arg", f"{key}={text}"]
    return flags


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_converted_folder(tmp_path_factory.mktemp("care") / "out", num_patients=4, size=64, depth=12)


@pytest.mark.parametrize("name", list(SMALL))
def test_fit_eval_and_a_bit_exact_checkpoint(name, data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code = usam_main(["fit", "--data", str(data_dir), "--out", str(out), "--model", name, *model_arg_flags(SMALL[name]),
                      "--points", "0", "--batch-size", "2", "--max-steps", "2", "--workers", "0", "--device", "cpu",
                      "--val-fraction", "0.5"])
    assert code == 0, capsys.readouterr().err
    assert "trained 2 steps" in capsys.readouterr().out
    model, config = load_checkpoint(out / "best")
    assert config["model"]["name"] == name and config["model"]["img_size"] == 32
    saved = load_file(out / "best" / "model.safetensors")
    assert set(saved) == set(model.state_dict())
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    save_checkpoint(model, tmp_path / "again", {"classes": config["classes"]})
    again, _ = load_checkpoint(tmp_path / "again")
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())
    images = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.eval()(images), again.eval()(images))

    code = usam_main(["eval", "--data", str(data_dir), "--checkpoint", str(out / "best"), "--device", "cpu",
                      "--out", str(tmp_path / "eval")])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["model"] == name and not metrics["prompted"] and metrics["num_cases"] == 2
    assert set(metrics["paper_protocol"]["dice"]) == {"rectum", "tumor"}


def count(model: torch.nn.Module, trainable: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


def test_full_size_parameter_counts_match_the_official_architectures():
    """Official: TransUNet R50-ViT-B_16 and Swin-Unet summed from their definitions (benchmarks/model_table.py);
    SAMed-H: SAM ViT-H at 224 + rank-4 LoRA on q and v, less SAM's IoU head (which SAMed never trains)."""
    with torch.device("meta"):
        transunet, samed_h = create_model("transunet"), create_model("samed_h")
    assert count(transunet) == 105_276_211
    assert count(create_model("swin_unet")) == 27_168_324
    assert count(samed_h) == 636_417_292
    lora = 32 * 4 * 4 * 1280  # blocks x (A_q, B_q, A_v, B_v) x rank x width
    decoder = sum(p.numel() for p in samed_h.mask_decoder.parameters())
    assert count(samed_h, trainable=True) == lora + decoder + 256  # + the no-mask embedding
    assert not any(p.requires_grad for n, p in samed_h.image_encoder.named_parameters() if ".lora_" not in n)


def test_lora_adapts_query_and_value_only_and_starts_as_the_plain_projection():
    base = torch.nn.Linear(8, 24)
    lora = LoRAQKV(base, rank=2)
    x = torch.randn(3, 8)
    assert torch.equal(lora(x), base(x))  # B starts at zero
    with torch.no_grad():
        lora.lora_b_q.weight.normal_()
        lora.lora_b_v.weight.normal_()
    q, k, v = (lora(x) - base(x)).chunk(3, dim=-1)
    assert q.abs().sum() > 0 and v.abs().sum() > 0 and torch.equal(k, torch.zeros_like(k))
    assert lora.weight is base.weight  # SAM's key names stay: attn.qkv.weight, attn.qkv.bias


def official_tiny_sam_state() -> dict[str, torch.Tensor]:
    """segment-anything's own modules at usam_tiny's sizes and SAM's 1024 input, as an official file holds them."""
    torch.manual_seed(0)
    parts = {
        "image_encoder": ImageEncoderViT(img_size=1024, embed_dim=192, depth=2, num_heads=3, out_chans=64,
                                         use_rel_pos=True, window_size=14, global_attn_indexes=(1,)),
        "prompt_encoder": PromptEncoder(embed_dim=64, image_embedding_size=(64, 64), input_image_size=(1024, 1024),
                                        mask_in_chans=16),
        "mask_decoder": MaskDecoder(transformer_dim=64, transformer=TwoWayTransformer(depth=2, embedding_dim=64,
                                                                                       mlp_dim=256, num_heads=4)),
    }
    return {f"{name}.{k}": v for name, part in parts.items() for k, v in part.state_dict().items()}


def test_samed_loads_an_official_sam_file_and_keeps_the_vit_frozen(tmp_path):
    state = official_tiny_sam_state()
    torch.save(state, tmp_path / "sam.pth")
    model = create_model("samed_tiny", sam_checkpoint=str(tmp_path / "sam.pth"))
    report, own = model.sam_load_report, model.state_dict()
    lora_keys = {k for k in own if ".lora_" in k}
    assert lora_keys and lora_keys <= set(report.new)
    assert torch.equal(own["image_encoder.blocks.0.attn.qkv.weight"], state["image_encoder.blocks.0.attn.qkv.weight"])
    assert torch.equal(own["image_encoder.patch_embed.proj.weight"], state["image_encoder.patch_embed.proj.weight"])
    assert "image_encoder.pos_embed" in report.resized
    groups = model.parameter_groups()
    trained = {id(p) for p in groups["decoder"]}
    names = [n for n, p in model.named_parameters() if id(p) in trained]
    assert groups["encoder"] == [] and all(".lora_" in n or n.startswith("mask_decoder.") for n in names
                                           if n != "prompt_encoder.no_mask_embed.weight")


def official_r50_vit_npz(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """An R50+ViT-B_16.npz in the official JAX layout (the names TransUNet's load_from reads), holding `model`'s
    own encoder weights, plus a class-token position and a classifier head as the ImageNet file has."""
    own = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    hwio = lambda a: a.transpose(2, 3, 1, 0)  # noqa: E731
    arrays = {"conv_root/kernel": hwio(own["resnet.conv1.weight"]), "gn_root/scale": own["resnet.bn1.weight"],
              "gn_root/bias": own["resnet.bn1.bias"], "head/kernel": np.zeros((768, 10), np.float32)}
    for b in (1, 2, 3):
        layer = [k for k in own if k.startswith(f"resnet.layer{b}.")]
        for u in range(1 + max(int(k.split(".")[2]) for k in layer)):
            p = f"resnet.layer{b}.{u}."
            for i in (1, 2, 3):
                arrays[f"block{b}/unit{u + 1}/conv{i}/kernel"] = hwio(own[f"{p}conv{i}.weight"])
                arrays[f"block{b}/unit{u + 1}/gn{i}/scale"] = own[f"{p}bn{i}.weight"]
                arrays[f"block{b}/unit{u + 1}/gn{i}/bias"] = own[f"{p}bn{i}.bias"]
            if f"{p}downsample.0.weight" in own:
                arrays[f"block{b}/unit{u + 1}/conv_proj/kernel"] = hwio(own[f"{p}downsample.0.weight"])
                arrays[f"block{b}/unit{u + 1}/gn_proj/scale"] = own[f"{p}downsample.1.weight"]
                arrays[f"block{b}/unit{u + 1}/gn_proj/bias"] = own[f"{p}downsample.1.bias"]
    d, heads = model.config["vit_embed_dim"], model.config["vit_num_heads"]
    arrays["embedding/kernel"] = hwio(own["vit.patch_embedding.patch_embeddings.weight"])
    arrays["embedding/bias"] = own["vit.patch_embedding.patch_embeddings.bias"]
    positions = own["vit.patch_embedding.position_embeddings"]
    arrays["Transformer/posembed_input/pos_embedding"] = np.concatenate([np.zeros((1, 1, d), np.float32), positions], 1)
    arrays["Transformer/encoder_norm/scale"], arrays["Transformer/encoder_norm/bias"] = own["vit.norm.weight"], \
        own["vit.norm.bias"]
    for i in range(model.config["vit_depth"]):
        p, root = f"vit.blocks.{i}.", f"Transformer/encoderblock_{i}/"
        q, k, v = np.split(own[f"{p}attn.qkv.weight"], 3)
        qb, kb, vb = np.split(own[f"{p}attn.qkv.bias"], 3)
        for name, w, b in (("query", q, qb), ("key", k, kb), ("value", v, vb)):
            arrays[f"{root}MultiHeadDotProductAttention_1/{name}/kernel"] = w.T.reshape(d, heads, d // heads)
            arrays[f"{root}MultiHeadDotProductAttention_1/{name}/bias"] = b.reshape(heads, d // heads)
        arrays[f"{root}MultiHeadDotProductAttention_1/out/kernel"] = own[f"{p}attn.out_proj.weight"].T.reshape(
            heads, d // heads, d)
        arrays[f"{root}MultiHeadDotProductAttention_1/out/bias"] = own[f"{p}attn.out_proj.bias"]
        for jax, ours in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
            arrays[f"{root}{jax}/scale"], arrays[f"{root}{jax}/bias"] = own[f"{p}{ours}.weight"], own[f"{p}{ours}.bias"]
        for jax, ours in (("MlpBlock_3/Dense_0", "mlp.linear1"), ("MlpBlock_3/Dense_1", "mlp.linear2")):
            arrays[f"{root}{jax}/kernel"] = own[f"{p}{ours}.weight"].T
            arrays[f"{root}{jax}/bias"] = own[f"{p}{ours}.bias"]
    return arrays


def test_transunet_loads_the_official_npz_layout(tmp_path):
    torch.manual_seed(1)
    source = create_model("transunet", **SMALL["transunet"])
    np.savez(tmp_path / "R50+ViT-B_16.npz", **official_r50_vit_npz(source))
    model = create_model("transunet", **SMALL["transunet"], pretrained=str(tmp_path / "R50+ViT-B_16.npz"))
    own, want = model.state_dict(), source.state_dict()
    report = model.pretrained_load_report
    assert report.loaded and all(k.startswith(("resnet.", "vit.")) for k in report.loaded)
    assert all(torch.equal(own[k], want[k]) for k in report.loaded)
    encoder = {n for n, _ in model.named_parameters() if n.startswith(("resnet.", "vit."))}
    assert encoder <= set(report.loaded)
    assert "head/kernel" in report.skipped
    with pytest.raises(ValueError, match="not the official R50\\+ViT-B_16.npz"):
        np.savez(tmp_path / "other.npz", x=np.zeros(2))
        create_model("transunet", pretrained=str(tmp_path / "other.npz"))
    with pytest.raises(ValueError, match="do not fit this model"):
        create_model("transunet", **{**SMALL["transunet"], "vit_embed_dim": 32},
                     pretrained=str(tmp_path / "R50+ViT-B_16.npz"))


def test_swin_unet_loads_the_official_swin_file_into_encoder_and_mirrored_decoder(tmp_path):
    """A Swin-T file (stage depths 2, 2, 6, 2, as Microsoft's) in the official key layout; Swin-Unet takes the
    blocks its depth (2 per stage) has, in the encoder and in the decoder stage that mirrors each."""
    source = create_model("swin_unet", **SMALL["swin_unet"])
    own = source.state_dict()
    state = {"head.weight": torch.zeros(10, 192), "norm.weight": own["norm.module.weight"],
             "norm.bias": own["norm.module.bias"], "layers.2.blocks.5.mlp.fc1.weight": torch.zeros(1)}
    for key, value in own.items():
        if key.startswith("encoder.patch_embed."):
            state[key.removeprefix("encoder.")] = value
        elif key.startswith("encoder.layers"):
            stage, rest = int(key[len("encoder.layers")]) - 1, key.split(".0.", 1)[1]
            state[f"layers.{stage}.{rest.replace('mlp.linear', 'mlp.fc')}"] = torch.randn_like(value.float())
    torch.save({"model": state}, tmp_path / "swin_tiny_patch4_window7_224.pth")
    weights = tmp_path / "swin_tiny_patch4_window7_224.pth"
    model = create_model("swin_unet", **SMALL["swin_unet"], pretrained=str(weights))
    loaded = model.state_dict()
    qkv = state["layers.1.blocks.0.attn.qkv.weight"]
    assert torch.equal(loaded["encoder.layers2.0.blocks.0.attn.qkv.weight"], qkv)
    assert torch.equal(loaded["stages.1.blocks.0.attn.qkv.weight"], qkv)  # decoder stage 1 mirrors encoder stage 1
    assert torch.equal(loaded["stages.0.blocks.1.mlp.linear2.bias"], state["layers.2.blocks.1.mlp.fc2.bias"])
    report = model.pretrained_load_report
    assert {"head.weight", "layers.2.blocks.5.mlp.fc1.weight"} <= set(report.skipped)
    assert "head.weight" in report.new and "expand_final.expand.weight" in report.new
    with pytest.raises(ValueError, match="no such file"):
        create_model("swin_unet", pretrained=str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="takes no pretrained weights"):
        create_model("vnet", pretrained=str(tmp_path / "swin_tiny_patch4_window7_224.pth"))

"""The model zoo: shapes, options, gradients, SAM equivalence, precision/layout, overfitting."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from usam.models import create_model, list_models
from usam.models.sam_parts import sam_modeling
from usam.models.summary import parameter_counts, parameter_table
from usam.prompts import sample_points_batch

SIZE = 224
DOCS = Path(__file__).resolve().parents[1] / "docs" / "models.md"


def blob_slices(count: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic CT-like slices: noisy background with one disc of class 1 and one of class 2."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    images, labels = [], []
    for _ in range(count):
        label = np.zeros((SIZE, SIZE), np.int64)
        image = rng.normal(0.3, 0.03, (SIZE, SIZE))
        for cls, value in ((1, 0.6), (2, 0.9)):
            cy, cx = rng.uniform(50, 174, 2)
            radius = rng.uniform(15, 30)
            disc = (yy - cy) ** 2 + (xx - cx) ** 2 < radius**2
            label[disc] = cls
            image[disc] = value + rng.normal(0, 0.03, disc.sum())
        images.append(image)
        labels.append(label)
    x = torch.tensor(np.array(images), dtype=torch.float32)[:, None].clamp(0, 1)
    return x, torch.tensor(np.array(labels))


def prompts_for(model, labels: torch.Tensor, rng=None):
    return sample_points_batch(labels, model.num_classes, model.points_per_class, rng)


def dice_per_class(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> list[float]:
    return [
        (2 * ((pred == c) & (target == c)).sum() / ((pred == c).sum() + (target == c).sum())).item()
        for c in range(1, num_classes)
    ]


def test_registry_lists_the_zoo_and_refuses_unknown_names():
    assert {"usam_b", "sam_b", "usam_tiny", "sam_tiny", "unet"} <= set(list_models())
    with pytest.raises(ValueError, match="unknown model 'usam_x'.*usam_b"):
        create_model("usam_x")
    with pytest.raises(ValueError, match="usam_tiny"):
        create_model("usam_tiny", not_an_option=1)


@pytest.mark.parametrize("name", ["usam_tiny", "sam_tiny", "unet"])
@pytest.mark.parametrize("num_classes", [2, 3])
def test_small_models_map_a_batch_to_class_logits(name, num_classes):
    kwargs = {"base_channels": 32} if name == "unet" else {}
    model = create_model(name, num_classes=num_classes, **kwargs).eval()
    images, labels = blob_slices(2)
    labels = labels.clamp(max=num_classes - 1)
    points, point_labels = prompts_for(model, labels) if name != "unet" else (None, None)
    with torch.no_grad():
        logits = model(images, points, point_labels)
        null = model(images)
    assert logits.shape == null.shape == (2, num_classes, SIZE, SIZE)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


@pytest.mark.parametrize("name", ["usam_b", "sam_b"])
def test_full_size_models_have_paper_shapes(name):
    model = create_model(name).eval()
    assert model.image_encoder.pos_embed.shape == (1, 14, 14, 768)
    assert len(model.image_encoder.blocks) == 12
    global_blocks = [i for i, b in enumerate(model.image_encoder.blocks) if b.window_size == 0]
    assert global_blocks == [2, 5, 8, 11]
    assert model.mask_decoder.num_mask_tokens == 3
    assert len(model.mask_decoder.output_hypernetworks_mlps) == 3
    images, labels = blob_slices(1)
    points, point_labels = prompts_for(model, labels)
    with torch.no_grad():
        assert model(images, points, point_labels).shape == (1, 3, SIZE, SIZE)
    if name == "usam_b":  # f0..f4 of the paper: D/8 x H .. 3D x H/16 with D = 256
        with torch.no_grad():
            f4, skips = model.cnn(images)
        assert [tuple(f.shape[1:]) for f in skips + [f4]] == [
            (32, 224, 224), (64, 112, 112), (128, 56, 56), (256, 28, 28), (768, 14, 14)
        ]


@pytest.mark.parametrize("skip_connections", [0, 1, 2, 3, 4])
def test_skip_connection_ablation_changes_only_the_decoder_inputs(skip_connections):
    model = create_model("usam_tiny", skip_connections=skip_connections).eval()
    ups = [model.up4, model.up3, model.up2, model.up1]
    used = [up.skip_channels > 0 for up in ups]
    assert used == [i < skip_connections for i in range(4)]
    images, labels = blob_slices(1)
    with torch.no_grad():
        assert model(images, *prompts_for(model, labels)).shape == (1, 3, SIZE, SIZE)


@pytest.mark.parametrize("k", [0, 1, 3, 5])
def test_points_per_class_sets_the_prompt_slots(k):
    model = create_model("usam_tiny", points_per_class=k).eval()
    assert model.num_points == 2 * k
    images, labels = blob_slices(2)
    points, point_labels = prompts_for(model, labels)
    assert points.shape == (2, 2 * k, 2)
    with torch.no_grad():
        assert model(images, points, point_labels).shape == (2, 3, SIZE, SIZE)
    if k:
        with pytest.raises(ValueError, match="K = .* = " + str(2 * k)):
            model(images, points[:, :-1], point_labels[:, :-1])


def test_bad_inputs_are_refused_with_a_clear_message():
    model = create_model("sam_tiny")
    with pytest.raises(ValueError, match="B x 1 x 224 x 224"):
        model(torch.rand(1, 3, SIZE, SIZE))
    with pytest.raises(ValueError, match="together"):
        model(torch.rand(1, 1, SIZE, SIZE), torch.zeros(1, 6, 2), None)
    with pytest.raises(ValueError, match="skip_connections"):
        create_model("usam_tiny", skip_connections=5)


@pytest.mark.parametrize("name", ["usam_tiny", "sam_tiny"])
def test_prompts_steer_the_output_and_padding_coordinates_do_not(name):
    torch.manual_seed(0)
    model = create_model(name).eval()
    images, labels = blob_slices(1)
    labels[labels == 2] = 0  # class 2 absent: its slots are padding
    points, point_labels = prompts_for(model, labels)
    assert (point_labels[0, 3:] == -1).all() and (point_labels[0, :3] == 1).all()
    with torch.no_grad():
        base = model(images, points, point_labels)
        moved_padding = points.clone()
        moved_padding[:, 3:] = 100.0
        assert torch.equal(model(images, moved_padding, point_labels), base)
        moved = points.clone()
        moved[:, :3] = torch.tensor([10.0, 200.0])
        assert not torch.allclose(model(images, moved, point_labels), base)
        assert not torch.allclose(model(images), base)


def test_class_embedding_tells_the_decoder_which_class_a_point_belongs_to():
    torch.manual_seed(0)
    model = create_model("sam_tiny", points_per_class=1).eval()
    assert torch.count_nonzero(model.class_embed) == 0  # zero-initialised
    images = torch.rand(1, 1, SIZE, SIZE)
    points = torch.tensor([[[60.0, 60.0], [160.0, 160.0]]])
    swapped = points.flip(1)
    point_labels = torch.ones(1, 2, dtype=torch.int64)
    with torch.no_grad():
        same = [model(images, p, point_labels) for p in (points, swapped)]
        # Without class embeddings the decoder cannot tell the slots apart.
        assert torch.allclose(same[0], same[1], atol=1e-5)
        model.class_embed.normal_()
        different = [model(images, p, point_labels) for p in (points, swapped)]
    assert not torch.allclose(different[0], different[1], atol=1e-3)


@pytest.mark.parametrize("name, options", [
    ("usam_tiny", {}), ("sam_tiny", {}), ("unet", {"base_channels": 32}),
    ("usam_tiny", {"decoder": "released", "prompt_style": "released"}),
], ids=["usam_tiny", "sam_tiny", "unet", "usam_tiny-released"])
def test_gradients_reach_every_trainable_parameter_and_no_frozen_one(name, options):
    torch.manual_seed(0)
    model = create_model(name, **options).train()
    images, labels = blob_slices(2)
    points, point_labels = prompts_for(model, labels, np.random.default_rng(0)) if name != "unet" else (None, None)
    loss = F.cross_entropy(model(images, points, point_labels), labels)
    loss.backward()
    groups = model.parameter_groups()
    trainable = [p for p in model.parameters() if p.requires_grad]
    grouped = groups["encoder"] + groups["decoder"]
    assert len({id(p) for p in grouped}) == len(grouped) == len(trainable)
    names = {id(p): n for n, p in model.named_parameters()}
    no_grad = [names[id(p)] for p in trainable if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []
    if name != "unet":
        frozen = list(model.prompt_encoder.parameters())
        assert frozen and all(not p.requires_grad and p.grad is None for p in frozen)
        encoder_ids = {id(p) for p in groups["encoder"]}
        assert all(id(p) in encoder_ids for p in model.image_encoder.parameters())
        assert model.class_embed is None or id(model.class_embed) not in encoder_ids
        assert all(id(p) not in encoder_ids for p in model.mask_decoder.parameters())
        if name == "usam_tiny":
            assert all(id(p) in encoder_ids for p in model.cnn.parameters())


def test_sam_b_equals_segment_anything_on_the_shared_parts():
    """Our sam_b, run through segment-anything's own modules with the same weights."""
    torch.manual_seed(0)
    model = create_model("sam_b").eval()
    for p in model.parameters():  # SAM initialises some tensors to zero; make all informative
        with torch.no_grad():
            p.add_(torch.randn_like(p) * 0.02)
    model.class_embed.data.zero_()

    reference = sam_modeling.Sam(
        image_encoder=sam_modeling.ImageEncoderViT(
            depth=12, embed_dim=768, img_size=SIZE, mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=12, patch_size=16,
            qkv_bias=True, use_rel_pos=True, global_attn_indexes=[2, 5, 8, 11], window_size=14,
            out_chans=256,
        ),
        prompt_encoder=sam_modeling.PromptEncoder(
            embed_dim=256, image_embedding_size=(14, 14), input_image_size=(SIZE, SIZE),
            mask_in_chans=16,
        ),
        mask_decoder=sam_modeling.MaskDecoder(
            num_multimask_outputs=2,
            transformer=sam_modeling.TwoWayTransformer(
                depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8
            ),
            transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256,
        ),
    ).eval()
    missing, unexpected = reference.load_state_dict(model.state_dict(), strict=False)
    assert unexpected == ["class_embed"]
    assert all(k.startswith("mask_decoder.iou_prediction_head.") for k in missing)
    images, labels = blob_slices(2)
    points, point_labels = prompts_for(model, labels)
    point_labels[1, 3:] = -1
    with torch.no_grad():
        ours = model(images, points, point_labels)
        for i in range(2):
            grey = (images[i] * 255).expand(3, -1, -1)
            embedding = reference.image_encoder(reference.preprocess(grey)[None])
            sparse, dense = reference.prompt_encoder(
                points=(points[i : i + 1], point_labels[i : i + 1]), boxes=None, masks=None
            )
            masks, _ = reference.mask_decoder.predict_masks(
                embedding, reference.prompt_encoder.get_dense_pe(), sparse, dense
            )
            expected = reference.postprocess_masks(masks, (SIZE, SIZE), (SIZE, SIZE))
            torch.testing.assert_close(ours[i : i + 1], expected, rtol=1e-4, atol=1e-4)


def test_usam_b_vit_is_sam_vit_b_without_the_patch_embedding():
    from segment_anything.build_sam import build_sam_vit_b

    with torch.device("meta"):
        sam = build_sam_vit_b()
        ours = create_model("usam_b")

    def count(module):
        return sum(p.numel() for p in module.parameters())
    # The 4 global blocks' relative position tables (h and w, 64 wide) shrink from 127 to 27 rows.
    shrink = 4 * 2 * (127 - 27) * 64
    assert count(ours.image_encoder.blocks) == count(sam.image_encoder.blocks) - shrink
    assert count(ours.image_encoder.neck) == count(sam.image_encoder.neck)
    assert count(ours.prompt_encoder) == count(sam.prompt_encoder)
    assert count(ours.mask_decoder.transformer) == count(sam.mask_decoder.transformer)


@pytest.mark.parametrize("name", ["usam_tiny", "sam_tiny"])
def test_bf16_autocast_and_channels_last_give_the_same_answer(name):
    torch.manual_seed(0)
    model = create_model(name).eval()
    images, labels = blob_slices(2)
    points, point_labels = prompts_for(model, labels)
    with torch.no_grad():
        reference = model(images, points, point_labels)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model(images, points, point_labels)
        model = model.to(memory_format=torch.channels_last)
        last = model(images.contiguous(memory_format=torch.channels_last), points, point_labels)
    assert torch.isfinite(half).all()
    assert F.cosine_similarity(half.float().flatten(), reference.flatten(), dim=0) > 0.99
    torch.testing.assert_close(last, reference, rtol=1e-4, atol=1e-4)


def test_config_is_json_and_rebuilds_the_same_architecture():
    model = create_model("usam_tiny", num_classes=4, skip_connections=2, points_per_class=5)
    config = json.loads(json.dumps(model.config))
    assert {"name", "num_classes", "img_size", "points_per_class"} <= set(config)
    rebuilt = create_model(**config)
    assert rebuilt.config == model.config
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == shapes


def test_docs_state_the_computed_parameter_counts():
    counts = parameter_counts("usam_tiny")
    assert counts["total"] == counts["trainable"] + counts["frozen"]
    assert counts["trainable"] == counts["encoder"] + counts["decoder"]
    text = DOCS.read_text(encoding="utf-8")
    assert parameter_table() in text, "regenerate with `python -m usam.models.summary`"


@pytest.mark.slow  # about 100 steps: ~1 min on 2 idle cores, much more on a loaded machine
def test_tiny_usam_overfits_a_handful_of_slices():
    torch.manual_seed(0)
    model = create_model("usam_tiny")
    images, labels = blob_slices(2, seed=1)
    points, point_labels = prompts_for(model, labels)
    groups = model.parameter_groups()
    optimizer = torch.optim.AdamW(
        [{"params": groups["encoder"]}, {"params": groups["decoder"]}], lr=3e-3
    )
    one_hot = F.one_hot(labels, 3).permute(0, 3, 1, 2).float()
    dice = [0.0]
    for step in range(1, 201):
        model.train()
        logits = model(images, points, point_labels)
        probs = logits.softmax(1)
        soft_dice = (2 * (probs * one_hot).sum((0, 2, 3)) + 1) / (
            probs.sum((0, 2, 3)) + one_hot.sum((0, 2, 3)) + 1
        )
        loss = F.cross_entropy(logits, labels) + 1 - soft_dice.mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 5 == 0:
            model.eval()
            with torch.no_grad():
                dice = dice_per_class(model(images, points, point_labels).argmax(1), labels, 3)
            if min(dice) > 0.95:
                break
    assert min(dice) > 0.95, f"Dice {dice} after {step} steps"


@pytest.mark.slow
def test_torch_compile_runs_the_tiny_model():
    torch._dynamo.reset()
    model = create_model("sam_tiny").eval()
    images, labels = blob_slices(1)
    points, point_labels = prompts_for(model, labels)
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(
            compiled(images, points, point_labels), model(images, points, point_labels)
        )


@pytest.mark.parametrize("torchvision_init", [
    None,  # not installed (as on the development machine, beside the CPU torch)
    'raise RuntimeError("operator torchvision::nms does not exist")\n',  # built for another torch
])
def test_sam_parts_load_without_a_working_torchvision(tmp_path, torchvision_init):
    """segment_anything's package __init__ imports torchvision; the models need only its modeling code."""
    if torchvision_init is not None:
        (tmp_path / "torchvision").mkdir()
        (tmp_path / "torchvision" / "__init__.py").write_text(torchvision_init)
    code = ("import importlib.util, sys\n"
            "found = importlib.util.find_spec('torchvision')\n"
            "assert (found is None) == (sys.argv[1] == 'absent'), found\n"
            "from usam.models import create_model\n"
            "import torch\n"
            "model = create_model('usam_tiny').eval()\n"
            "print(tuple(model(torch.zeros(1, 1, 224, 224), None, None).shape))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", code, "absent" if torchvision_init is None else "broken"],
                            capture_output=True, text=True, env=env, cwd=tmp_path)
    if torchvision_init is None and "AssertionError" in result.stderr:
        pytest.skip("a torchvision is installed here")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "(1, 3, 224, 224)"


RELEASED_CODE_PARAMETERS = 104_155_791  # kanydao/U-SAM's model as it counts them (docs/reproduction.md)


def test_released_decoder_has_d_over_8_tokens_and_a_conv_head():
    model = create_model("usam_tiny", decoder="released").eval()  # D = 64: 8 tokens
    assert model.config["decoder"] == "released" and model.config["head_bias"] == "none"
    assert model.mask_decoder.num_mask_tokens == 8 and len(model.mask_decoder.output_hypernetworks_mlps) == 8
    assert model.up1.up.in_channels == 8
    assert isinstance(model.head[0][0], torch.nn.Conv2d) and model.head[0][0].kernel_size == (3, 3)
    assert model.head[1].kernel_size == (1, 1) and model.head[1].bias is None
    images, labels = blob_slices(2)
    with torch.no_grad():
        assert model(images, *prompts_for(model, labels)).shape == (2, 3, SIZE, SIZE)
    assert create_model(**model.config).config == model.config


def test_usam_b_with_the_released_decoder_counts_within_1_percent_of_the_released_code():
    counts = parameter_counts("usam_b", decoder="released")
    # the released model also holds an unused patch embedding (590,592), IoU head (139,808) and low-resolution
    # head (9,411), and biases in its convolutions before BatchNorm
    assert counts["total"] == 103_412_908
    assert abs(counts["total"] / RELEASED_CODE_PARAMETERS - 1) < 0.01
    assert parameter_counts("usam_b")["total"] == 99_329_334


@pytest.mark.parametrize("bias, expected", [("prior", "log priors"), ("default", "other"), ("none", None)])
def test_head_bias_options(bias, expected):
    for name, kwargs in (("usam_tiny", {}), ("unet", {"base_channels": 8})):
        torch.manual_seed(0)
        head = create_model(name, head_bias=bias, **kwargs).head
        if expected is None:
            assert head.bias is None
        else:
            priors = torch.tensor([0.99, 0.005, 0.005]).log()
            assert torch.allclose(head.bias, priors) == (expected == "log priors")


@pytest.mark.parametrize("name", ["usam_tiny", "sam_tiny"])
def test_released_prompt_style_has_no_class_identity(name):
    torch.manual_seed(0)
    model = create_model(name, prompt_style="released").eval()
    assert model.class_embed is None and "class_embed" not in model.state_dict()
    images = torch.rand(1, 1, SIZE, SIZE)
    points = torch.tensor([[[60.0, 60.0], [70.0, 62.0], [64.0, 70.0], [160.0, 160.0], [150.0, 170.0], [170.0, 150.0]]])
    point_labels = torch.ones(1, 6, dtype=torch.int64)
    with torch.no_grad():  # the two groups swapped: the same answer, nothing tells the model which is which
        torch.testing.assert_close(model(images, points, point_labels),
                                   model(images, points[:, [3, 4, 5, 0, 1, 2]], point_labels), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="prompt_style must be one of classwise, released"):
        create_model(name, prompt_style="other")


def _reference_forward(model, images, points, point_labels):
    """The forward pass as one piece (before encode_image/decode_prompts existed), for comparison."""
    from usam.models.sam_parts import mask_logits

    if model.config["name"].startswith("sam"):
        embeddings = model.image_encoder(model.preprocess(images))
        hyper_in, src = model.decode(embeddings, points, point_labels)
        logits = mask_logits(hyper_in, model.mask_decoder.output_upscaling(src))
        return torch.nn.functional.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)
    f4, (f0, f1, f2, f3) = model.cnn(images)
    hyper_in, src = model.decode(model.image_encoder(f4), points, point_labels)
    x = model.up2(model.up3(model.up4(src, f3), f2), f1)
    return model.head(model.up1(mask_logits(hyper_in, x), f0))


@pytest.mark.parametrize("name,options", [
    ("usam_tiny", {}), ("sam_tiny", {}), ("usam_tiny", {"decoder": "released", "prompt_style": "released"}),
], ids=["usam_tiny", "sam_tiny", "usam_tiny-released"])
def test_forward_is_decode_prompts_of_encode_image_exactly(name, options):
    torch.manual_seed(3)
    model = create_model(name, **options).eval()
    images = torch.rand(2, 1, SIZE, SIZE)
    points = torch.rand(2, model.num_points, 2) * SIZE
    point_labels = torch.tensor([[1, -1, 1, 1, 1, -1], [1, 1, 1, -1, -1, -1]])
    with torch.no_grad():
        features = model.encode_image(images)
        for p, lab in ((points, point_labels), (None, None)):
            whole = model(images, p, lab)
            assert torch.equal(whole, model.decode_prompts(features, p, lab))
            assert torch.equal(whole, _reference_forward(model, images, p, lab))
        one = model.decode_prompts(features.select(slice(1, 2)), points[1:], point_labels[1:])
        assert torch.allclose(one, model(images[1:], points[1:], point_labels[1:]), atol=1e-5)


def test_extra_slots_take_negative_clicks_and_refuse_positive_ones():
    torch.manual_seed(0)
    model = create_model("usam_tiny").eval()
    images = torch.rand(1, 1, SIZE, SIZE)
    points = torch.rand(1, model.num_points + 1, 2) * SIZE
    labels = torch.tensor([[1, 1, 1, -1, -1, -1, 0]])
    with torch.no_grad():
        assert not torch.equal(model(images, points, labels), model(images, points[:, :-1], labels[:, :-1]))
    with pytest.raises(ValueError, match="negative clicks"):
        model(images, points, torch.tensor([[1, 1, 1, -1, -1, -1, 1]]))

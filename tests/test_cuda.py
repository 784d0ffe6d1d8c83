"""CUDA paths (skipped without a GPU; run by benchmarks/gpu_check.sh): bf16 + channels_last training steps,
`usam fit` on the GPU, and GPU inference agreeing with the CPU."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from care_dataset.synth.phantom import phantom_volume
from converted_folders import make_converted_folder
from usam.config import build_config
from usam.models.registry import create_model
from usam.predict import predict_volume
from usam.train import soft_dice_loss, train

pytestmark = pytest.mark.cuda


def random_batch(model, size: int, device: str):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(size, 1, 224, 224, generator=g)
    points = torch.rand(size, model.num_points, 2, generator=g) * 223
    labels = torch.ones(size, model.num_points, dtype=torch.int64)
    target = torch.randint(0, 3, (size, 224, 224), generator=g)
    return [t.to(device) for t in (images, points, labels, target)]


@pytest.mark.parametrize("name", ["usam_b", "sam_b", "usam_tiny"])
def test_bf16_channels_last_training_step(name):
    torch.manual_seed(0)
    model = create_model(name).cuda().to(memory_format=torch.channels_last)
    images, points, labels, target = random_batch(model, 8, "cuda")
    images = images.contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(images, points, labels)
    assert logits.shape == (8, 3, 224, 224)
    loss = 0.4 * F.cross_entropy(logits.float(), target) + 0.6 * soft_dice_loss(logits, target)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    # bf16 forward agrees with fp32 on the same weights; without the head's class-prior bias, which alone would
    # make every pixel background in both
    with torch.no_grad():
        model.eval()
        if hasattr(model, "head"):
            model.head.bias.zero_()
        reference = model(images.float(), points, labels)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            half = model(images, points, labels).float()
    assert ((half - reference).norm() / reference.norm()).item() < 0.05  # 0.005-0.011 with CPU bf16
    agreement = (half.argmax(1) == reference.argmax(1)).float().mean().item()
    assert agreement > 0.98


def test_fit_on_cuda_logs_and_checkpoints(tmp_path):
    data = make_converted_folder(tmp_path / "out", num_patients=6, size=96, depth=16)
    run = tmp_path / "run"
    result = train(build_config({"data": str(data), "out": str(run), "model": "usam_tiny", "batch_size": 8,
                                 "max_steps": 6, "workers": 2, "device": "cuda", "log_every": 2,
                                 "val_every": 3, "val_fraction": 0.25}))
    assert result["step"] == 6
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["kind"] == "train"]
    assert train_records and all(0 <= r["data_wait_fraction"] <= 1 for r in train_records)
    assert (run / "best" / "model.safetensors").is_file() and (run / "last" / "train_state.pt").is_file()


def test_gpu_inference_matches_cpu():
    """Device-side window and resize, bf16, channels_last and the way back to the input grid give the CPU's
    labels. The untrained model's head is shifted so that each class wins on part of the volume (left alone,
    its class-prior bias makes every voxel background on both devices, and a flipped result would pass)."""
    torch.manual_seed(0)
    model = create_model("unet").eval()
    hu, _ = phantom_volume((12, 256, 256), (2.5, 1.2, 1.2), np.random.default_rng(3), tumour=True)
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing((1.2, 1.2, 2.5))
    image.SetDirection((-1, 0, 0, 0, 1, 0, 0, 0, 1))  # not the canonical orientation
    config = {"model": dict(model.config), "classes": ["background", "normal rectum", "tumor"],
              "window": [-125.0, 275.0]}
    head_outputs = []
    hook = model.head.register_forward_hook(lambda module, inputs, output: head_outputs.append(output))
    predict_volume(model, config, image, device="cpu")
    hook.remove()
    with torch.no_grad():  # each class's median logit over the volume to 0
        model.head.bias -= torch.cat(head_outputs).transpose(0, 1).flatten(1).median(dim=1).values
    cpu = sitk.GetArrayFromImage(predict_volume(model, config, image, device="cpu"))
    assert min((cpu == c).mean() for c in range(3)) > 0.05
    gpu_image = predict_volume(model, config, image, device="cuda")
    gpu = sitk.GetArrayFromImage(gpu_image)
    assert gpu_image.GetSize() == image.GetSize() and gpu_image.GetDirection() == image.GetDirection()
    assert (cpu == gpu).mean() > 0.98  # bf16 on the GPU: voxels near a tie may differ (0.997 with CPU bf16)
    assert (cpu == gpu[:, :, ::-1]).mean() < 0.9  # and the check can tell a mirrored result

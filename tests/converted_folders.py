"""Small converted CARE folders (docs/format.md) written directly with the shard writer, for the tests of the
readers and of care-publish, and the check that two samples are the same slice."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from care_dataset import files
from care_dataset.format import layout, writer
from care_dataset.synth.phantom import phantom_volume

CLASSES = ["background", "normal rectum", "tumor"]
PHANTOM_CLASSES = ["background", "rectum", "tumor"]  # make_converted_folder's


def blob_case(rng: np.random.Generator, n: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """A small CT-like case: soft tissue disc in air with noise, a rectum blob and a tumor blob inside it."""
    yy, xx = np.mgrid[:h, :w]
    image = np.full((n, h, w), -1000, np.int16)
    label = np.zeros((n, h, w), np.uint8)
    cy, cx = h / 2 + rng.uniform(-3, 3), w / 2 + rng.uniform(-3, 3)
    for k in range(n):
        body = ((yy - h / 2) / (0.45 * h)) ** 2 + ((xx - w / 2) / (0.48 * w)) ** 2 < 1
        image[k][body] = (40 + rng.normal(0, 25, body.sum())).astype(np.int16)
        r = 0.12 * h * (1 + 0.3 * np.sin(k / 3))
        rectum = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
        label[k][rectum] = 1
        image[k][rectum] -= 30
        if k % 3 != 0:
            tumor = rectum & (xx > cx + 0.3 * r)
            label[k][tumor] = 2
            image[k][tumor] += 25
    return image, label


def make_converted(root: Path, storage: str = "zarr", shapes: list[tuple[int, int, int]] | None = None,
                   seed: int = 0) -> Path:
    """Write a converted CARE folder per docs/format.md with writer.write_case and the JSON files."""
    shapes = shapes or [(16, 64, 64)] * 4
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    writer.init_store(root, storage)
    case_ids = [f"p{i:04d}{chr(97 + i)}_{i % 2}" for i in range(len(shapes))]
    split_of = {c: ("test" if i == len(shapes) - 1 else "train") for i, c in enumerate(case_ids)}
    cases, checksums = {}, {}
    for i, (case_id, (n, h, w)) in enumerate(zip(case_ids, shapes)):
        image, label = blob_case(rng, n, h, w)
        writer.write_case(root, storage, case_id, image, label)
        depth = n + 10
        kept = list(range(3, 3 + n)) if i != 1 else [2 * k + 1 for k in range(n)]  # one non-contiguous case
        spacing = [0.7 + 0.05 * i, 0.7 + 0.05 * i, 2.5 + 0.5 * (i % 2)]
        canonical = {"size": [w, h, max(depth, kept[-1] + 1)], "spacing": spacing,
                     "origin": [-100.0 + i, -120.0, 30.5 * i], "direction": [1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0]}
        voxels = {name: int((label == v).sum()) for v, name in enumerate(CLASSES)}
        checksum = layout.content_checksum(image, label)
        cases[case_id] = {"split": split_of[case_id], "num_slices": n, "kept_slices": kept,
                          "canonical": canonical, "spacing": spacing,
                          "original": {**canonical, "orientation": "LPS"},
                          "voxels_before": voxels, "voxels_after": voxels, "checksum": checksum}
        checksums[case_id] = checksum
    overall = hashlib.sha256("".join(checksums[c] for c in sorted(checksums)).encode()).hexdigest()
    splits = {"seed": 0, "strategy": "patient",
              "train": sorted(c for c in case_ids if split_of[c] == "train"),
              "test": sorted(c for c in case_ids if split_of[c] == "test")}
    manifest = {
        "format": layout.FORMAT_NAME, "format_version": layout.FORMAT_VERSION, "storage": storage,
        "classes": CLASSES, "profile": {"name": "care", "sha256": "0" * 64, "toml": "name = \"care\"\n"},
        "splits": {s: {"cases": len(splits[s]), "slices": sum(cases[c]["num_slices"] for c in splits[s])}
                   for s in ("train", "test")},
        "checksums": {"cases": checksums, "all": overall},
        "tool": "care-usam", "tool_version": "0.1.0", "key_reproducible": True,
    }
    files.write_json_atomic(root / "dataset.json", manifest)
    files.write_json_atomic(root / "splits.json", splits)
    files.write_json_atomic(root / "cases.json", cases)
    files.write_json_atomic(root / "report.json", [{"case_id": c, "status": "converted", "reason": ""}
                                                   for c in case_ids])
    return root


def assert_sample_equal(got: dict, want: dict) -> None:
    assert set(got) >= {"image", "label", "case_id", "slice_index", "spacing"}
    assert got["image"].dtype == np.int16 and got["label"].dtype == np.uint8
    np.testing.assert_array_equal(got["image"], want["image"])
    np.testing.assert_array_equal(got["label"], want["label"])
    assert got["case_id"] == want["case_id"]
    assert int(got["slice_index"]) == want["slice_index"]
    assert tuple(float(s) for s in got["spacing"]) == want["spacing"]


def make_converted_folder(root: Path, num_patients: int = 6, size: int = 64, depth: int = 24,
                          storage: str = "zarr", seed: int = 0, case_ids: list[str] | None = None) -> Path:
    """A small converted CARE folder (docs/format.md) of synthetic pelvic phantoms: one case per patient (or
    the given `case_ids`, one phantom each), the slices that hold a label kept, cases 0 and 1 in the test split,
    the rest in train."""
    writer.init_store(root, storage)
    cases, checksums = {}, {}
    splits = {"seed": seed, "strategy": "patient", "train": [], "test": []}
    case_ids = case_ids or [f"P{p:03d}_a" for p in range(num_patients)]
    for p, case_id in enumerate(case_ids):
        hu, label = phantom_volume((depth, size, size), (5.0, 400.0 / size, 400.0 / size),
                                   np.random.default_rng([seed, p]), tumour=True)
        kept = np.flatnonzero(label.reshape(depth, -1).max(1) > 0)
        image, label = np.ascontiguousarray(hu[kept]), np.ascontiguousarray(label[kept])
        writer.write_case(root, storage, case_id, image, label)
        split = "test" if p < 2 else "train"
        splits[split].append(case_id)
        checksum = layout.content_checksum(image, label)
        checksums[case_id] = checksum
        spacing = [400.0 / size, 400.0 / size, 5.0]
        cases[case_id] = {"split": split, "num_slices": len(kept), "kept_slices": kept.tolist(),
                          "spacing": spacing, "checksum": checksum,
                          "canonical": {"size": [size, size, depth], "spacing": spacing, "origin": [0.0] * 3,
                                        "direction": [1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0]}}
    manifest = {"format": layout.FORMAT_NAME, "format_version": layout.FORMAT_VERSION, "storage": storage,
                "classes": PHANTOM_CLASSES, "checksums": {"cases": checksums, "all": "f" * 64}}
    files.write_json_atomic(root / "dataset.json", manifest)
    files.write_json_atomic(root / "splits.json", splits)
    files.write_json_atomic(root / "cases.json", cases)
    return root

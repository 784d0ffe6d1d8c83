"""CareSliceDataset: the same sample dicts from converted shards and from the published Hugging Face dataset."""

from __future__ import annotations

import multiprocessing

import numpy as np
import pytest
import torch
from torch.utils.data import ConcatDataset, DataLoader

from care_dataset import open_any
from care_dataset.format import reader
from care_dataset.format.torch_dataset import CareSliceDataset, source_kind
from care_dataset.publish.job import publish
from converted_folders import assert_sample_equal, make_converted


@pytest.fixture(scope="module")
def folders(tmp_path_factory, hf_offline):  # noqa: F811
    """(converted h5 folder, published folder)."""
    base = tmp_path_factory.mktemp("torch_ds")
    source = make_converted(base / "converted", "h5", shapes=[(10, 48, 48)] * 4, seed=7)
    output = base / "care"
    publish(source, output, max_shard_mb=0.02)
    return source, output


def add_one_to_image(sample: dict) -> dict:
    """A picklable transform (spawn workers import it from this module)."""
    return {**sample, "image": sample["image"].astype(np.int32) + 1}


def test_every_sample_is_equal_from_shards_and_from_the_hub_format(folders):
    import datasets

    source, output = folders
    care = reader.open_dataset(source)
    for split in ("train", "test"):
        sources = [source, care, output, open_any(output), datasets.load_dataset(str(output)),
                   datasets.load_dataset(str(output), split=split)]
        views = [CareSliceDataset(s, split) for s in sources]
        assert {len(v) for v in views} == {care.num_slices(split)}
        for i in range(care.num_slices(split)):
            want = care.sample(split, i)
            for view in views:
                got = view[i]
                assert set(got) == set(want)
                assert type(got["case_id"]) is str and type(got["slice_index"]) is int
                assert all(type(s) is float for s in got["spacing"])
                assert got["image"].flags.writeable and got["label"].flags.writeable
                assert_sample_equal(got, want)
        assert all(v.case_ids == care.case_ids(split) for v in views)


def test_case_slices_indices_and_bounds(folders):
    source, output = folders
    shards, hub = CareSliceDataset(source, "train"), CareSliceDataset(output, "train")
    case_id = shards.case_ids[1]
    assert shards.case_slices(case_id) == hub.case_slices(case_id) == list(range(10, 20))
    assert {hub[i]["case_id"] for i in hub.case_slices(case_id)} == {case_id}
    assert_sample_equal(hub[-1], shards[len(shards) - 1])
    with pytest.raises(IndexError):
        hub[len(hub)]
    with pytest.raises(KeyError):
        shards.case_slices("nope")
    with pytest.raises(KeyError, match="no split"):
        CareSliceDataset(output, "validation")


def test_selected_hub_dataset_follows_its_index_mapping(folders):
    import datasets

    source, output = folders
    care = reader.open_dataset(source)
    hub = datasets.load_dataset(str(output), split="train")
    order = [7, 0, 29, 12]
    view = CareSliceDataset(hub.select(order), "train")
    assert len(view) == 4
    for j, i in enumerate(order):
        assert_sample_equal(view[j], care.sample("train", i))


def test_transform_is_applied(folders):
    source, _ = folders
    plain, shifted = CareSliceDataset(source, "test"), CareSliceDataset(source, "test", transform=add_one_to_image)
    np.testing.assert_array_equal(shifted[2]["image"], plain[2]["image"].astype(np.int32) + 1)


def test_a_folder_path_is_opened_with_the_reader_of_its_kind(folders, tmp_path):
    source, output = folders
    assert source_kind(source) == "converted" and repr(CareSliceDataset(source, "test")).startswith(
        "CareSliceDataset(shards,")
    assert source_kind(output) == "published" and repr(CareSliceDataset(output, "test")).startswith(
        "CareSliceDataset(published,")
    with pytest.raises(FileNotFoundError, match="neither"):
        source_kind(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither"):
        CareSliceDataset(tmp_path)


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_dataloader_with_two_workers(folders, start_method):
    if start_method not in multiprocessing.get_all_start_methods():
        pytest.skip(f"{start_method} start method not available")
    source, output = folders
    import datasets

    sources = (source, output, datasets.load_dataset(str(output), split="train"))
    parts = [CareSliceDataset(src, "train", transform=add_one_to_image) for src in sources]
    for part in parts:
        part[0]  # opens handles in the parent: workers must still get fresh ones
    dataset = ConcatDataset(parts)  # one loader (one set of workers) reads both kinds of source
    loader = DataLoader(dataset, batch_size=4, num_workers=2, shuffle=False, multiprocessing_context=start_method)
    batches = list(loader)
    images = torch.cat([b["image"] for b in batches])
    assert images.shape == (len(dataset), 48, 48)
    expected = np.stack([dataset[i]["image"] for i in range(len(dataset))])
    np.testing.assert_array_equal(images.numpy(), expected)
    assert [c for b in batches for c in b["case_id"]] == [dataset[i]["case_id"] for i in range(len(dataset))]

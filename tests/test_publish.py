"""care-publish: a synthetic converted folder -> Hugging Face dataset folder -> load_dataset offline."""

from __future__ import annotations

import getpass
import hashlib
import io
import socket
from pathlib import Path
from types import SimpleNamespace

import datasets
import huggingface_hub
import nibabel as nib
import numpy as np
import PIL.Image
import pyarrow.parquet as pq
import pytest
import SimpleITK as sitk
import torch
import yaml
from datasets.info import DatasetInfosDict
from datasets.utils.metadata import MetadataConfigs

from care_dataset import files
from care_dataset.cli import publish_main
from care_dataset.convert.pipeline import convert_dataset
from care_dataset.deid.verify import collect_identifying_values, scan_for_leaks
from care_dataset.format import layout, reader
from care_dataset.format.hf import iter_samples, slice_features, volume_features
from care_dataset.format.span import FILL_HU
from care_dataset.publish import job as pub
from care_dataset.publish.card import LEAK_SCAN_NOTES, default_card_path
from care_dataset.publish.preview import preview_png
from care_dataset.raw.profiles import load_profile
from care_dataset.synth.raw_export import write_raw_dataset
from converted_folders import CLASSES, assert_sample_equal, make_converted

# ---------------------------------------------------------------- fixtures

PHI_LIKE_FOLDER = "DOE_JOHN_19700101"  # a raw-looking folder name that must never reach the output


@pytest.fixture(scope="module")
def published(tmp_path_factory, hf_offline):
    """(converted folder, published folder) from a zarr source with several shards per split."""
    base = tmp_path_factory.mktemp("publish")
    source = make_converted(base / PHI_LIKE_FOLDER, "zarr")
    output = base / "care"
    pub.publish(source, output, max_shard_mb=0.05)
    return source, output


def load_slices(path, split=None, **kwargs):
    return datasets.load_dataset(str(path), "slices", split=split, **kwargs)


# ---------------------------------------------------------------- round trip


def test_slices_load_back_equal_to_the_source(published):
    source, output = published
    care = reader.open_dataset(source)
    loaded = datasets.load_dataset(str(output))  # default configuration: slices
    assert list(loaded) == ["train", "test"]
    features = loaded["train"].features
    assert isinstance(features["image"], datasets.Array2D) and features["image"].dtype == "int16"
    assert isinstance(features["label"], datasets.Array2D) and features["label"].dtype == "uint8"
    assert features["label_classes"].feature.names == CLASSES
    for split in ("train", "test"):
        rows = loaded[split].with_format("numpy", dtype=None)
        assert len(rows) == care.num_slices(split)
        for i in range(len(rows)):
            row = rows[i]
            want = care.sample(split, i)
            assert_sample_equal(row, want)
            assert row["label_classes"].tolist() == np.unique(want["label"]).tolist()


def canonical_grid(geometry: dict) -> sitk.Image:
    """An empty image on the case's canonical grid, as ITK (and ITK-SNAP) place its voxels (LPS)."""
    canonical = geometry["canonical"]
    grid = sitk.Image([int(v) for v in canonical["size"]], sitk.sitkUInt8)
    grid.SetSpacing(canonical["spacing"])
    grid.SetOrigin(canonical["origin"])
    grid.SetDirection(canonical["direction"])
    return grid


def assert_on_canonical_grid(nifti: nib.Nifti1Image, geometry: dict) -> None:
    """NIfTI voxel (i, j, k) lies where canonical voxel (i, j, kept_slices[0] + k) does (RAS = LPS with x, y
    negated); checked at the span's eight corners."""
    grid, first = canonical_grid(geometry), geometry["kept_slices"][0]
    for corner in np.ndindex(2, 2, 2):
        index = [c * (n - 1) for c, n in zip(corner, nifti.shape)]
        lps = grid.TransformIndexToPhysicalPoint([index[0], index[1], first + index[2]])
        ras = nifti.affine @ [*index, 1]
        np.testing.assert_allclose(ras[:3], [-lps[0], -lps[1], lps[2]], atol=1e-4)


def stored_slices(nifti: nib.Nifti1Image, geometry: dict) -> np.ndarray:
    """The (n, H, W) slices at the kept canonical indices of a span volume, in its stored dtype."""
    volume = np.asanyarray(nifti.dataobj).transpose(2, 1, 0)  # NIfTI (x, y, z) -> (z, y, x)
    return volume[np.asarray(geometry["kept_slices"]) - geometry["kept_slices"][0]]


def test_volumes_are_nifti_images_on_the_canonical_grid(published):
    source, output = published
    care = reader.open_dataset(source)
    volumes = datasets.load_dataset(str(output), "volumes")
    assert isinstance(volumes["train"].features["image"], datasets.Nifti)
    gaps = 0
    for split in ("train", "test"):
        rows = volumes[split]
        assert rows["case_id"] == care.case_ids(split)
        for row in rows:
            case_id = row["case_id"]
            geometry = care.cases[case_id]
            image, label = care.read_case(case_id)
            for nifti, stored, dtype in ((row["image"], image, np.int16), (row["label"], label, np.uint8)):
                assert isinstance(nifti, nib.Nifti1Image) and nifti.get_data_dtype() == dtype
                assert nifti.shape[2] == geometry["kept_slices"][-1] - geometry["kept_slices"][0] + 1
                assert_on_canonical_grid(nifti, geometry)
                np.testing.assert_array_equal(stored_slices(nifti, geometry), stored)
                assert stored_slices(nifti, geometry).dtype == dtype
            np.testing.assert_array_equal(row["image"].affine, row["label"].affine)
            filled = np.setdiff1d(np.arange(row["image"].shape[2]), np.asarray(geometry["kept_slices"])
                                  - geometry["kept_slices"][0])
            assert (np.asanyarray(row["image"].dataobj)[..., filled] == FILL_HU).all()
            assert (np.asanyarray(row["label"].dataobj)[..., filled] == 0).all()
            gaps += len(filled)
            assert row["kept_slices"] == geometry["kept_slices"]
            for key in ("size", "spacing", "origin", "direction"):
                assert row[key] == geometry["canonical"][key]
            assert row["checksum"] == geometry["checksum"] == layout.content_checksum(image, label)
    assert gaps > 0  # the fixture's non-contiguous case


def test_load_by_relative_name_from_parent_and_torch_format(published, monkeypatch):
    source, output = published
    care = reader.open_dataset(source)
    monkeypatch.chdir(output.parent)
    test = datasets.load_dataset(output.name, split="test").with_format("torch", dtype=None)
    sample = test[3]
    assert sample["image"].dtype == torch.int16 and sample["label"].dtype == torch.uint8
    want = care.sample("test", 3)
    np.testing.assert_array_equal(sample["image"].numpy(), want["image"])
    np.testing.assert_array_equal(sample["label"].numpy(), want["label"])


def test_streaming_yields_every_sample(published):
    source, output = published
    care = reader.open_dataset(source)
    stream = load_slices(output, "train", streaming=True)
    samples = list(iter_samples(stream, batch_size=5))
    assert len(samples) == care.num_slices("train")
    for i, sample in enumerate(samples):
        assert_sample_equal(sample, care.sample("train", i))
    plain = list(stream)  # the plain rows (Python lists) hold the same values
    np.testing.assert_array_equal(np.asarray(plain[7]["image"]), care.sample("train", 7)["image"])


# ---------------------------------------------------------------- folder, README and card


def test_readme_header_lists_configs_splits_and_features(published):
    source, output = published
    care = reader.open_dataset(source)
    text = (output / "README.md").read_text()
    assert text.startswith("---\n")
    header = yaml.safe_load(text.split("\n---\n", 1)[0][4:])
    assert {c["config_name"] for c in header["configs"]} == {"slices", "volumes"}
    default = [c for c in header["configs"] if c.get("default")]
    assert [c["config_name"] for c in default] == ["slices"]
    for config in header["configs"]:
        assert [f["split"] for f in config["data_files"]] == ["train", "test"]
    infos = {i["config_name"]: i for i in header["dataset_info"]}
    splits = {s["name"]: s["num_examples"] for s in infos["slices"]["splits"]}
    assert splits == {s: care.num_slices(s) for s in ("train", "test")}
    assert {s["name"]: s["num_examples"] for s in infos["volumes"]["splits"]} == {"train": 3, "test": 1}
    names = {f["name"]: f for f in infos["slices"]["features"]}
    assert names["image"]["dtype"]["array2_d"] == {"shape": [64, 64], "dtype": "int16"}
    assert names["label"]["dtype"]["array2_d"] == {"shape": [64, 64], "dtype": "uint8"}
    assert list(names["label_classes"]["list"]["class_label"]["names"].values()) == CLASSES
    files = sorted(p.relative_to(output).as_posix() for p in output.rglob("*.parquet"))
    assert infos["slices"]["download_size"] + infos["volumes"]["download_size"] == \
        sum((output / f).stat().st_size for f in files)
    assert "image-segmentation" in header["task_categories"] and "medical" in header["tags"]
    assert header["license"]
    for f in files:  # the card lists every shard with its checksum
        assert f"`{f}`" in text
        assert hashlib.sha256((output / f).read_bytes()).hexdigest() in text


def test_readme_metadata_parses_with_the_hub_card_tools(published):
    """The README.md header read as the Hub reads it: huggingface_hub's card parser (the Hub's YAML block regex,
    DatasetCardData without ignoring errors) and datasets' parsers of `configs` and `dataset_info`. The Hub's own
    validation endpoint (DatasetCard.validate) needs the network and is not called."""
    source, output = published
    care = reader.open_dataset(source)
    card = huggingface_hub.DatasetCard.load(output / "README.md")
    assert isinstance(card.data, huggingface_hub.DatasetCardData)
    assert card.data.to_dict() == huggingface_hub.metadata_load(output / "README.md")  # nothing dropped or renamed
    assert huggingface_hub.DatasetCard(str(card)).data.to_dict() == card.data.to_dict()
    assert card.data.size_categories == ["n<1K"] and card.data.task_categories == ["image-segmentation"]
    configs = MetadataConfigs.from_dataset_card_data(card.data)
    assert list(configs) == ["slices", "volumes"] and configs.get_default_config_name() == "slices"
    for name, config in configs.items():
        for data_files in config["data_files"]:
            assert sorted(output.glob(data_files["path"])), data_files
    infos = DatasetInfosDict.from_dataset_card_data(card.data)
    assert infos["slices"].features == slice_features(care.class_names, (64, 64))
    assert infos["volumes"].features == volume_features(care.class_names)
    assert infos["slices"].features["preview"] == datasets.Image()
    assert infos["volumes"].features["image"] == infos["volumes"].features["label"] == datasets.Nifti()
    for name, info in infos.items():
        assert {split: s.num_examples for split, s in info.splits.items()} == \
            {split: len(care.case_ids(split)) if name == "volumes" else care.num_slices(split)
             for split in ("train", "test")}


def test_slices_preview_shows_each_slice(published):
    source, output = published
    care = reader.open_dataset(source)
    test = load_slices(output, "test")
    assert test.features["preview"] == datasets.Image()
    for i in (0, len(test) - 1):
        preview, want = test[i]["preview"], care.sample("test", i)
        assert preview.format == "PNG" and preview.mode == "RGB" and preview.size == (64, 64)
        np.testing.assert_array_equal(np.asarray(preview), np.asarray(PIL.Image.open(io.BytesIO(
            preview_png(want["image"], want["label"])))))


def test_shards_respect_the_size_limit_and_keep_the_features(published):
    _, output = published
    train = sorted((output / "slices").glob("train-*.parquet"))
    assert len(train) >= 2
    assert [p.name for p in train] == [f"train-{i:05d}-of-{len(train):05d}.parquet" for i in range(len(train))]
    features = datasets.load_dataset(str(output), split="test").features
    for path in train:
        assert path.stat().st_size < 2 * 0.05 * 2**20
        schema = pq.read_schema(path)
        assert datasets.Features.from_arrow_schema(schema) == features


def test_output_has_no_identifying_or_machine_values(published):

    source, output = published
    forbidden = {str(source), str(source.parent), PHI_LIKE_FOLDER, str(Path.home())}
    user, host = getpass.getuser(), socket.gethostname()
    if len(user) >= 4:
        forbidden.add(f"/{user}")
    if len(host) >= 6:  # shorter names occur by chance in compressed bytes
        forbidden.add(host)
    files = [p for p in output.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"README.md", "dataset.json", "splits.json", "cases.json"}
    for path in files:
        data = path.read_bytes()
        for value in forbidden:
            assert value.encode() not in data, f"{value!r} found in {path.relative_to(output)}"
    assert not list(output.parent.glob(".care.publish-*"))  # no temporary folder left behind


def test_publishing_twice_gives_identical_bytes(published, tmp_path):
    source, output = published
    again = tmp_path / "elsewhere" / "care"
    pub.publish(source, again, max_shard_mb=0.05)
    first = {p.relative_to(output).as_posix(): p.read_bytes() for p in output.rglob("*") if p.is_file()}
    second = {p.relative_to(again).as_posix(): p.read_bytes() for p in again.rglob("*") if p.is_file()}
    assert first.keys() == second.keys()
    for name in first:
        assert first[name] == second[name], name


def test_h5_source_with_varying_inplane_sizes(tmp_path, hf_offline):
    source = make_converted(tmp_path / "conv", "h5", shapes=[(6, 48, 40), (5, 40, 40), (7, 48, 56)], seed=3)
    output = tmp_path / "care"
    stats = pub.publish(source, output)
    assert all(len(s.files) == 1 for by_split in stats.values() for s in by_split.values())
    care = reader.open_dataset(source)
    loaded = load_slices(output)
    assert isinstance(loaded["train"].features["image"], datasets.List)
    for split in ("train", "test"):
        rows = loaded[split].with_format("numpy", dtype=None)
        for i in range(len(rows)):
            assert_sample_equal(rows[i], care.sample(split, i))
    volumes = datasets.load_dataset(str(output), "volumes", split="train")
    case_id = care.case_ids("train")[1]
    image, label = care.read_case(case_id)
    assert volumes[1]["image"].shape[:2] == (image.shape[2], image.shape[1])  # NIfTI (x, y, z)
    np.testing.assert_array_equal(stored_slices(volumes[1]["image"], care.cases[case_id]), image)
    np.testing.assert_array_equal(stored_slices(volumes[1]["label"], care.cases[case_id]), label)


# ---------------------------------------------------------------- CLI, errors and push


def run_cli(argv: list[str]) -> int:
    return publish_main(argv)


def test_cli_refuses_existing_output_unless_overwrite(published, tmp_path, capsys):
    source, _ = published
    output = tmp_path / "care"
    output.mkdir()
    (output / "stale.txt").write_text("old")
    assert run_cli([str(source), str(output)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exists" in err[0] and "--overwrite" in err[0]
    assert run_cli([str(source), str(output), "--overwrite"]) == 0
    assert not (output / "stale.txt").exists() and (output / "README.md").is_file()


def test_corrupt_case_fails_with_its_id_and_leaves_nothing(tmp_path, hf_offline):
    source = make_converted(tmp_path / "conv", "zarr", shapes=[(4, 32, 32)] * 3)
    cases = layout.read_json(source / "cases.json")
    bad = sorted(cases)[1]
    cases[bad]["checksum"] = "f" * 64
    files.write_json_atomic(source / "cases.json", cases)
    with pytest.raises(pub.PublishError, match=f"case {bad}:"):
        pub.publish(source, tmp_path / "care")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conv"]


class StubHub:
    """Stands in for huggingface_hub's HfApi and get_token: records what a push would send; no network."""

    def __init__(self, repos: dict[str, bool] | None = None, token: str | None = "hf_test_token"):
        self.repos = dict(repos or {})  # repo_id -> private
        self.token = token
        self.calls: list[tuple] = []
        self.uploaded: dict[str, bytes] = {}

    def __call__(self) -> StubHub:  # `HfApi()`
        return self

    def get_token(self) -> str | None:
        self.calls.append(("get_token",))
        return self.token

    def create_repo(self, repo_id, repo_type, private, exist_ok):
        self.calls.append(("create_repo", repo_id, repo_type, private))
        self.repos.setdefault(repo_id, private)

    def repo_info(self, repo_id, repo_type):
        self.calls.append(("repo_info", repo_id))
        return SimpleNamespace(private=self.repos[repo_id])

    def upload_folder(self, folder_path, repo_id, repo_type, commit_message):
        self.calls.append(("upload_folder", repo_id, repo_type))
        root = Path(folder_path)
        self.uploaded = {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}
        return SimpleNamespace(commit_url=f"https://hub.test/{repo_id}/commit/1")

    def names(self) -> list[str]:
        return [call[0] for call in self.calls]


@pytest.fixture
def hub(monkeypatch) -> StubHub:
    stub = StubHub()
    monkeypatch.setattr(pub, "HfApi", stub)
    monkeypatch.setattr(huggingface_hub, "get_token", stub.get_token)
    return stub


@pytest.fixture
def clean_raw(tmp_path) -> Path:
    """A raw folder whose only identifying value (its case folder's name) is not in the published folder."""
    return raw_with_case_folder(tmp_path / "raw", PHI_LIKE_FOLDER)


def raw_with_case_folder(raw: Path, name: str) -> Path:
    """`raw` holding one case folder `name` with an unreadable volume file: its name is an identifying value."""
    (raw / name).mkdir(parents=True)
    (raw / name / "ct.mha").write_bytes(b"not a volume")
    return raw


def card_with_licence(tmp_path: Path, licence: str) -> Path:
    card = tmp_path / "card.md"
    card.write_text(default_card_path().read_text(encoding="utf-8").replace("license: unknown", f"license: {licence}"),
                    encoding="utf-8")
    return card


def test_push_creates_a_private_repo_and_uploads_the_scanned_folder(published, clean_raw, hub, tmp_path, capsys):
    source, _ = published
    output = tmp_path / "care"
    assert run_cli([str(source), str(output), "--push", "someone/care", "--raw", str(clean_raw)]) == 0
    assert hub.names() == ["get_token", "create_repo", "repo_info", "upload_folder"]
    assert hub.calls[1] == ("create_repo", "someone/care", "dataset", True)  # private
    assert hub.calls[3] == ("upload_folder", "someone/care", "dataset")
    assert set(hub.uploaded) == {p.relative_to(output).as_posix() for p in output.rglob("*") if p.is_file()}
    assert {"README.md", "metadata/cases.json"} <= set(hub.uploaded)
    assert LEAK_SCAN_NOTES["scanned"] in hub.uploaded["README.md"].decode()
    assert "(private repository)" in capsys.readouterr().out


def test_push_without_raw_is_refused_before_any_work_or_network(published, hub, tmp_path, capsys):
    source, _ = published
    assert run_cli([str(source), str(tmp_path / "care"), "--push", "someone/care"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("care-publish: error: --push needs --raw RAW") and "--no-verify" in error
    assert hub.calls == [] and not (tmp_path / "care").exists()


@pytest.mark.parametrize("extra, message", [
    (["--raw", "{raw}"], "--raw applies to --push only"),
    (["--public"], "--public applies to --push only"),
    (["--push", "a/b", "--raw", "{raw}", "--no-verify"], "pass either --raw or --no-verify, not both"),
    (["--push", "a/b", "--raw", "{missing}"], "folder not found"),
])
def test_push_options_that_cannot_go_together_are_usage_errors(published, clean_raw, hub, tmp_path, capsys, extra,
                                                               message):
    source, _ = published
    extra = [arg.format(raw=clean_raw, missing=tmp_path / "missing") for arg in extra]
    assert run_cli([str(source), str(tmp_path / "care"), *extra]) == 2
    assert message in capsys.readouterr().err
    assert hub.calls == [] and not (tmp_path / "care").exists()


def test_public_push_is_refused_while_the_licence_is_unknown(published, clean_raw, hub, tmp_path, capsys):
    source, existing = published
    output = tmp_path / "care"
    assert run_cli([str(source), str(output), "--push", "someone/care", "--raw", str(clean_raw), "--public"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "public push is refused while the licence" in error[0] and "license:" in error[0]
    assert hub.calls == [] and not output.exists()
    with pytest.raises(pub.PublishError, match="licence in README.md is unknown"):
        pub.push(existing, "someone/care", public=True, raw=clean_raw)  # the folder's own card is checked too
    assert hub.calls == []


def test_public_push_with_a_licence_creates_a_public_repo(published, clean_raw, hub, tmp_path, capsys):
    source, _ = published
    card = card_with_licence(tmp_path, "cc-by-nc-4.0")
    argv = [str(source), str(tmp_path / "care"), "--card", str(card), "--push", "someone/care", "--raw",
            str(clean_raw), "--public"]
    assert run_cli(argv) == 0
    assert ("create_repo", "someone/care", "dataset", False) in hub.calls and hub.uploaded
    assert "license: cc-by-nc-4.0" in hub.uploaded["README.md"].decode()
    assert "(public repository)" in capsys.readouterr().out


def test_an_existing_public_repo_gets_nothing_without_public(published, clean_raw, hub, tmp_path, capsys):
    source, _ = published
    hub.repos["someone/care"] = False
    assert run_cli([str(source), str(tmp_path / "care"), "--push", "someone/care", "--raw", str(clean_raw)]) == 1
    assert "not private; nothing was uploaded: pass --public" in capsys.readouterr().err
    assert "upload_folder" not in hub.names()


def test_no_verify_warns_of_the_risk_and_the_card_records_it(published, hub, tmp_path, capsys):
    source, _ = published
    assert run_cli([str(source), str(tmp_path / "care"), "--push", "someone/care", "--no-verify"]) == 0
    err = capsys.readouterr().err
    assert "warning: --no-verify" in err and "would be published" in err
    assert LEAK_SCAN_NOTES["skipped"] in hub.uploaded["README.md"].decode()


def test_a_leak_stops_the_push_before_any_network_access(published, hub, tmp_path, capsys):
    source, _ = published
    leaked = reader.open_dataset(source).case_ids()[0]  # a raw folder named like a case ID: found in the output
    raw = raw_with_case_folder(tmp_path / "raw", leaked)
    assert run_cli([str(source), str(tmp_path / "care"), "--push", "someone/care", "--raw", str(raw)]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "leak scan:" in error[0] and "nothing was uploaded" in error[0]
    assert leaked not in error[0] and hub.calls == []


def test_push_without_a_token_is_refused_before_creating_anything(published, clean_raw, hub, tmp_path, capsys):
    source, _ = published
    hub.token = None
    assert run_cli([str(source), str(tmp_path / "care"), "--push", "someone/care", "--raw", str(clean_raw)]) == 1
    assert "token" in capsys.readouterr().err and hub.names() == ["get_token"]


def test_synth_convert_publish_end_to_end_leaks_nothing(tmp_path, hf_offline):
    """Raw synthetic DICOM with fake PHI -> care-convert -> care-publish -> load_dataset; care-verify's scanner
    finds none of the raw identifying values in the published folder."""

    raw, out, care_dir = tmp_path / "raw", tmp_path / "out", tmp_path / "care"
    write_raw_dataset(raw, cases=3, seed=1, size=64, slices=24, messy=False)
    convert_dataset(raw, out, load_profile("care"), b"test-key" * 4, True, seed=0, storage="zarr", progress=False)
    pub.publish(out, care_dir)
    values = collect_identifying_values(raw)
    assert len(values) > 10  # the synthetic export does carry fake PHI
    assert scan_for_leaks(care_dir, values) == []
    care = reader.open_dataset(out)
    loaded = load_slices(care_dir)
    for split in care.splits:
        rows = loaded[split].with_format("numpy", dtype=None)
        assert len(rows) == care.num_slices(split) > 0
        for i in range(len(rows)):
            assert_sample_equal(rows[i], care.sample(split, i))

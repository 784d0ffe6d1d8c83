"""The fuzzing harness (benchmarks/fuzz_inputs.py) on a seeded sample: mutated real and synthetic raw cases through
care-convert, care-anonymize, care-verify and usam predict's image reader. The categories the code gets right are
asserted zero; those still being fixed are expected failures until then."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import fuzz_inputs  # noqa: E402  (benchmarks/ is not a package)

SAMPLE_CASES = len(fuzz_inputs.MUTATIONS) + 8  # every mutation kind at least once
SAMPLE_SEED = 1
READER = "usam.predict.read_image"


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("fuzz")
    cases, findings = fuzz_inputs.fuzz(SAMPLE_CASES, SAMPLE_SEED, workdir, timeout=60, batch_size=SAMPLE_CASES)
    return cases, findings


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return fuzz_inputs.prepare_sources(tmp_path_factory.mktemp("sources"), seed=0)[0]


def found(findings, category: str, tools=None) -> dict[str, set[str]]:
    return {tool: cases for tool, cases in findings.items[category].items()
            if cases and (tools is None or tool in tools)}


def test_the_sample_covers_every_mutation_kind_and_prints_a_table(sample):
    cases, findings = sample
    assert {c.kind for c in cases} == set(fuzz_inputs.MUTATIONS)
    table = fuzz_inputs.table(cases, findings)
    for category in fuzz_inputs.CATEGORIES:
        assert category in table
    assert all(kind in table for kind in fuzz_inputs.MUTATIONS)


@pytest.mark.parametrize("category", ["hang", "missing", "unreadable", "partial", "leak"])
def test_no_case_of_the_sample_hangs_goes_missing_gives_unreadable_or_partial_output_or_leaks(sample, category):
    assert found(sample[1], category) == {}, [n for n in sample[1].notes if n.startswith(category)]


def test_no_care_command_prints_a_traceback_on_the_sample(sample):
    tools = {"care-convert", "care-anonymize", "care-verify"}
    assert found(sample[1], "traceback", tools) == {}, [n for n in sample[1].notes if n.startswith("traceback")]


def test_every_failure_of_the_sample_has_an_actionable_reason(sample):
    assert found(sample[1], "unexplained") == {}, [n for n in sample[1].notes if n.startswith("unexplained")]


def test_no_library_warning_reaches_the_terminal(sample):
    assert found(sample[1], "warning") == {}, [n for n in sample[1].notes if n.startswith("warning")]


def test_the_image_reader_raises_only_input_errors(sample):
    assert found(sample[1], "traceback", {READER}) == {}, [n for n in sample[1].notes if n.startswith("traceback")]


def test_mutated_cases_are_the_same_for_a_seed_and_differ_between_seeds(sources, tmp_path):
    def digests(seed: int, where: Path) -> list:
        where.mkdir()
        return [fuzz_inputs.tree_digest(fuzz_inputs.make_case(i, seed, sources, where).folder)
                for i in range(len(fuzz_inputs.MUTATIONS))]

    first, again, other = digests(3, tmp_path / "a"), digests(3, tmp_path / "b"), digests(4, tmp_path / "c")
    assert first == again
    assert first != other


@pytest.mark.parametrize("kind", sorted(fuzz_inputs.MUTATIONS))
def test_each_mutation_kind_changes_its_input(sources, tmp_path, kind):
    applies = fuzz_inputs.MUTATIONS[kind][0]
    usable = [s for s in sources if applies(fuzz_inputs.case_files(s.folder))]
    if not usable:
        pytest.skip(f"no source for {kind}: the real data in ../shared/data is absent")
    for index in range(2):
        case = fuzz_inputs.make_case(index, 0, sources, tmp_path, kind=kind)
        source = next(s for s in sources if s.name == case.source)
        assert case.kind == kind
        assert fuzz_inputs.tree_digest(case.folder) != fuzz_inputs.tree_digest(source.folder), case.detail


def test_corrupt_stream_mutations_say_which_file_they_corrupted(sources, tmp_path):
    cases = [fuzz_inputs.make_case(i, 0, sources, tmp_path, kind="corrupt_gzip") for i in range(4)]
    assert all(c.corrupt_role in ("image", "label") for c in cases)


@pytest.mark.parametrize("reason, unexplained", [
    ("", True), ("unexpected error (ValueError)", True), ("unexpected error while de-identifying (KeyError)", True),
    ("ValueError", True), ("(OSError)", True), ("KeyError: 'Rows'", True),
    ("the annotation file cannot be read (corrupt, truncated or not a volume)", False),
    ("several annotation files (2) match *seg*, *label*", False),
])
def test_unexplained_reasons_are_defined_precisely(reason, unexplained):
    assert fuzz_inputs.is_unexplained(reason) == unexplained


def test_cases_of_seed_0_with_a_corrupt_stream_are_not_converted(sources, tmp_path):
    if not {"totalseg_nifti", "ge_dicom"} <= {s.name for s in sources}:
        pytest.skip("needs the real data in ../shared/data")
    raw = tmp_path / "raw"
    raw.mkdir()
    cases = [fuzz_inputs.make_case(index, 0, sources, raw) for index in (112, 188)]  # converted by the old code
    assert [(c.detail, c.corrupt_role) for c in cases] == [("gzip crc", "label"), ("pixels of label .nrrd", "label")]
    profile = tmp_path / "fuzz.toml"
    profile.write_text(fuzz_inputs.PROFILE)
    findings = fuzz_inputs.Findings()
    fuzz_inputs.check_convert(cases, raw, tmp_path, 60, profile, findings)
    assert found(findings, "corrupt") == {}, findings.notes

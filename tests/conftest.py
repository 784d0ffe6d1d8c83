"""Suite-wide settings (one intra-op thread per pytest-xdist worker, offline Hugging Face) and shared fixtures."""

from __future__ import annotations

import os
import shutil

import datasets
import huggingface_hub.constants
import pytest


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # `make test` runs one worker per core; torch's default of one thread per core would oversubscribe them.
        import torch

        torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device; run benchmarks/gpu_check.sh on a GPU machine")
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="module")
def hf_offline(tmp_path_factory):
    """Offline Hub, quiet progress bars and a private datasets cache for this module."""
    cache = tmp_path_factory.mktemp("hf_cache")
    with pytest.MonkeyPatch.context() as mp:
        for name, value in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_DISABLE_PROGRESS_BARS", "1"),
                            ("HF_DATASETS_CACHE", str(cache))):
            mp.setenv(name, value)
        mp.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        datasets.disable_progress_bars()
        yield cache


@pytest.fixture
def unprivileged() -> list[str]:
    """A command prefix under which file permissions apply: none for a user, setpriv without root's DAC
    override for root; skips the test where neither is possible."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: permissions cannot be made to apply")
    caps = "-dac_override,-dac_read_search"
    return ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}"]

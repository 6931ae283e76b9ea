from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from calib_tiny_models import build_v3, write_samples  # noqa: E402


@pytest.fixture(scope="session")
def v3_dir(tmp_path_factory) -> Path:
    return build_v3(tmp_path_factory.mktemp("v3") / "model")


@pytest.fixture(scope="session")
def samples_file(tmp_path_factory) -> Path:
    return write_samples(tmp_path_factory.mktemp("samples") / "samples.json")

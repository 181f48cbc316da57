"""Shared fixtures. Real data lives in ../shared/data beside the clone; tests that need it skip,
saying why, when it is absent (a fresh clone must still pass)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CTSDK_SHARED_DATA", REPO.parent / "shared" / "data")).resolve()


def shared_path(*parts: str) -> Path:
    """Path under ../shared/data, or skip the test with the reason."""
    p = SHARED_DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"shared data not found: {p} (set CTSDK_SHARED_DATA or place ../shared/data beside the repo)")
    return p


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return shared_path()


@pytest.fixture(scope="session")
def covid_p001() -> Path:
    return shared_path("dicom", "covid-ct-md", "covid-P001")

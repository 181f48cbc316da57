"""sdk.paths: one answer to "where is the shared data", for a checkout and for an installed copy."""
from __future__ import annotations

from pathlib import Path

import pytest

import sdk
from sdk import paths


def test_env_wins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(paths.ENV, str(tmp_path))
    assert paths.shared_data_candidates() == [tmp_path.resolve()]
    assert paths.shared_data_root() == tmp_path.resolve()


def test_without_env_checkout_then_cwd(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(paths.ENV, raising=False)
    work = tmp_path / "somewhere"
    work.mkdir()
    monkeypatch.chdir(work)
    cands = paths.shared_data_candidates()
    checkout = paths.source_checkout()
    pkg_root = Path(sdk.__file__).resolve().parents[1]
    # a checkout has pyproject.toml beside sdk/; an installed copy (pip install --target) has not
    assert (checkout is not None) == (pkg_root / "pyproject.toml").is_file()
    want = ([(checkout.parent / "shared" / "data").resolve()] if checkout else []) + [(tmp_path / "shared" / "data").resolve()]
    assert cands == want
    # nothing exists: the first candidate is named; then the cwd's sibling once it exists
    if not cands[0].is_dir():
        assert paths.shared_data_root() == cands[0]
    (tmp_path / "shared" / "data").mkdir(parents=True)
    if checkout is None or not cands[0].is_dir():
        assert paths.shared_data_root() == (tmp_path / "shared" / "data").resolve()


def test_every_default_asks_sdk_paths(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The export samples and the classifier trainer give the same root as sdk.paths."""
    from sdk.export.samples import shared_data_root as samples_root
    from sdk.train.classifier import default_data_root

    monkeypatch.setenv(paths.ENV, str(tmp_path))
    assert samples_root() == default_data_root() == tmp_path.resolve()

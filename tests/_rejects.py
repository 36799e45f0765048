"""The contract of every label import that fails: an error naming the problems, nothing written."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from segrl.labeling import LabelImportError


def assert_rejected_whole(store, run_import: Callable[[], object], words: list[str]) -> None:
    """``run_import()`` raises LabelImportError whose message holds every word; ``store`` unchanged."""
    before = store.list(recursive=True)
    with pytest.raises(LabelImportError) as err:
        run_import()
    for word in words:
        assert word in str(err.value), (word, str(err.value))
    assert store.list(recursive=True) == before

"""The full corpus matrix is marked ``slow``: skipped unless a marker expression is given.

``pytest tests/models`` runs one case per family; ``pytest -m slow tests/models`` runs the rest.
"""

from __future__ import annotations

from pathlib import Path

import pytest

_HERE = Path(__file__).parent


def pytest_collection_modifyitems(config, items):
    if config.option.markexpr:
        return
    skip = pytest.mark.skip(reason="slow: the full corpus matrix; run with -m slow")
    for item in items:
        if "slow" in item.keywords and _HERE in Path(item.path).parents:
            item.add_marker(skip)

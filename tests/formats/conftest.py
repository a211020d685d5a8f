"""Session-wide data for the block-format tests, generated once and shared by every format."""
from __future__ import annotations

import numpy as np
import pytest

from format_checks import make_datasets, make_importance


@pytest.fixture(scope="session")
def datasets() -> dict[str, np.ndarray]:
    """name -> (256, 4096) float32: normal, student_t3, sparse_outliers, all_equal_rows, zeros."""
    return make_datasets()


@pytest.fixture(scope="session")
def importance() -> np.ndarray:
    """(4096,) float32 imatrix-like vector with a few zero columns."""
    return make_importance()

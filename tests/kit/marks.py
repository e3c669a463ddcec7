"""pytest marks the test files share: what skips without ../shared/data. Only tests import this module; the
benchmarks never import pytest.
"""

import pytest

from kit.data import SHARED_DATA


needs_shared_data = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason=f"real data and tokenizer files not found at {SHARED_DATA} (CI provides them)")

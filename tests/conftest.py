import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# every kernel test runs in the Triton interpreter on CPU tensors
os.environ.setdefault("TRITON_INTERPRET", "1")
# every buffer a kernel writes starts as NaN (lopt_gen.runtime.engine.kernel_buffer), so that an
# element a kernel fails to write fails the comparison it reaches; read when lopt_gen is imported
os.environ.setdefault("LOPT_GEN_POISON", "1")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Compiled user specs go to a per-session cache, never the user's home."""
    monkeypatch.setenv("LOPT_GEN_CACHE", str(tmp_path_factory.getbasetemp() / "lopt_gen_cache"))

"""Peak resident memory of this process (kept here for the bench scripts; the code is glm_tune's)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from glm_tune.process_memory import peak_rss_mb  # noqa: E402,F401

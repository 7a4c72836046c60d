import os
import sys
import tempfile
from pathlib import Path

# The sibling's own modules (recipe, convert_weights, …) import one another by name, as they do when run as
# scripts from ascend/; the main suite's modules are installed (pyproject.toml).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# MindFormers writes its logs under $LOCAL_DEFAULT_PATH (default ./output): keep test runs out of the checkout.
os.environ.setdefault("LOCAL_DEFAULT_PATH", tempfile.mkdtemp(prefix="glm_tune_mindformers_"))

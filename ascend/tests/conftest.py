import os
import tempfile

# MindFormers writes its logs under $LOCAL_DEFAULT_PATH (default ./output): keep test runs out of the checkout.
os.environ.setdefault("LOCAL_DEFAULT_PATH", tempfile.mkdtemp(prefix="glm_tune_mindformers_"))

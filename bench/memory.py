"""Peak resident memory of this process (kept here for the bench scripts; the code is glm_tune's)."""

from glm_tune.process_memory import peak_rss_mb  # noqa: F401

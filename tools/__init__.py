"""Helper commands of glm-tune (model/data builders, converters). Each module is also importable."""

"""The config tree; `schema.py` holds it whole until the split into schema, loader and checks."""

from ofs_scale.config.schema import *  # noqa: F403

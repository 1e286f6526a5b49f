"""Intensity settings of the site preprocessing that a logged model must carry (the site's
``client/preprocessing.py`` applies them; the coordinator records them with the model)."""

from __future__ import annotations

DEFAULT_CT_WINDOW_HU = (40.0, 400.0)
"""CT window (level, width) in Hounsfield units: soft tissue."""

PERCENTILES = (0.5, 99.5)
"""Intensity percentiles mapped to 0 and 1 for every modality except CT."""

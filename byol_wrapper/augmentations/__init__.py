"""Per-sample GPU augmentations for BYOL (being split into a package, issue 11; see ``views.py``)."""

from .views import *  # noqa: F401,F403
from .views import __all__, __doc__  # noqa: F401
from .views import (  # noqa: F401
    _C_ORDER,
    _CPU_CHUNK_VALUES,
    _N_RAND,
    _color_jitter,
    _cpu_chunk,
    _crop_boxes,
    _hue,
    _jitter_positions,
)

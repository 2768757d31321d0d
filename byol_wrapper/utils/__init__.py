"""Small helpers shared by the package, one concern per file (timm's ``utils/`` layout).

- :mod:`byol_wrapper.utils.checks`: validation of user arguments, with messages that name the argument and the fix.
"""

from . import checks

__all__ = ["checks"]

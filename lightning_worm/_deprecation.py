"""Names kept for one minor release after a rename: they work as before and say what replaces them."""

from __future__ import annotations

import warnings
from typing import Any

__all__ = ["RenamedAttribute", "warn_renamed"]

#: The release that removes the names renamed in 0.2.
REMOVAL = "0.3"


def warn_renamed(old: str, new: str, stacklevel: int = 3) -> None:
    """Warn (``DeprecationWarning``) that ``old`` is now ``new``."""
    warnings.warn(f"`{old}` is deprecated since lightning-worm 0.2 and is removed in {REMOVAL}: use `{new}`.",
                  DeprecationWarning, stacklevel=stacklevel)


class RenamedAttribute:
    """A class attribute that reads and writes the attribute ``new`` under its old name, with a warning.

    Example::

        class PruningReport:
            channels_before = RenamedAttribute("units_before")
    """

    def __init__(self, new: str) -> None:
        self.new = new
        self.old = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.old = f"{owner.__name__}.{name}"

    def __get__(self, obj: Any, owner: type) -> Any:
        if obj is None:
            return self
        warn_renamed(self.old, f"{owner.__name__}.{self.new}")
        return getattr(obj, self.new)

    def __set__(self, obj: Any, value: Any) -> None:
        warn_renamed(self.old, f"{type(obj).__name__}.{self.new}")
        setattr(obj, self.new, value)

"""A module's class swapped for a subclass that overrides its forward (the fused norm and rotary modules), and back.

The subclass is `(mixin, cls)`: the mixin's forward first, the module's own class behind it, so `super().forward` is
the original and isinstance checks (peft's, transformers') still see the class they made. One subclass is made per
pair and kept, so every module of a class shares it.
"""

from __future__ import annotations

_MADE: dict[tuple[type, type], type] = {}


def mixed(mixin: type, cls: type, prefix: str) -> type:
    """The subclass (mixin, cls), named prefix + cls's name."""
    if (mixin, cls) not in _MADE:
        _MADE[mixin, cls] = type(prefix + cls.__name__, (mixin, cls), {})
    return _MADE[mixin, cls]


def unmixed(module, mixin: type) -> type | None:
    """The class a module had before `mixed` gave it `mixin`, or None if its class is not such a subclass."""
    bases = type(module).__bases__
    return bases[1] if len(bases) == 2 and bases[0] is mixin else None

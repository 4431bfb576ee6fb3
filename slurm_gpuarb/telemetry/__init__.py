"""GPU telemetry: which GPUs a node has, their memory and MIG layout, and who holds memory on them.

Choose a backend with :func:`select` (``auto`` | ``nvml`` | ``smi`` | ``fake:<preset>``);
every backend implements :class:`Telemetry`. Importing this package is cheap: a backend's
module (and ``pynvml``) is imported only when it is selected.
"""

from .base import Telemetry, backends, proc_identity, register, select

__all__ = ["Telemetry", "backends", "presets", "proc_identity", "register", "select"]


def presets() -> list[str]:
    """Names of the ``fake:<preset>`` presets."""
    from .fake import presets as _presets

    return _presets()

"""One exception hierarchy for the whole project.

Every error a user can cause or fix is a :class:`GpuArbError`. ``str(err)`` is one
line that tells the whole story: the message, then the cause it was raised from
(``raise TelemetryError("could not read GPU 3 memory") from e``).

Every Slurm hook imports this module on its hot path, so it imports nothing (no ``typing``, no
``enum``) and does no work beyond defining the classes.
"""

from __future__ import annotations


class GpuArbError(Exception):
    """Base of every error the project raises on purpose."""

    def __str__(self) -> str:
        msg = super().__str__()
        cause = self.__cause__
        if cause is not None:
            detail = str(cause) or type(cause).__name__
            if detail not in msg:
                msg = f"{msg}: {detail}"
        return msg


class ConfigError(GpuArbError):
    """A configuration file, environment variable or option is wrong (names file, key, expectation)."""


class LeaseSpecError(GpuArbError):
    """A lease spec (``--comment 'gpuarb: …'``) is malformed; the message quotes the token."""


class TelemetryError(GpuArbError):
    """GPU telemetry could not be read."""


class LedgerError(GpuArbError):
    """The ledger database could not be opened, migrated, read or written."""


class SchemaVersionError(LedgerError):
    """The ledger's schema is not the revision this code expects (run ``gpuarb db upgrade``)."""


class CapacityError(GpuArbError):
    """A capacity question has no answer (unknown SKU, MIG profile that does not exist, …)."""


class RenderError(GpuArbError):
    """A Slurm configuration file could not be rendered from the inventory."""


class ProtocolError(GpuArbError):
    """A lease-protocol message is malformed or of an unsupported version."""


class NotFoundError(GpuArbError):
    """A lease, job or decision that was asked for does not exist."""


class PermissionDeniedError(GpuArbError, PermissionError):
    """The caller may not do this over the daemon's socket (wire kind ``PermissionError``).

    Both a :class:`GpuArbError` (the CLI's error mapping catches it) and a builtin
    :class:`PermissionError`.
    """


class NodeFault(GpuArbError):
    """The node itself is faulty (the only reason a Prolog/Epilog may exit non-zero)."""

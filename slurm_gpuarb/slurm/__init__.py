"""Talking to Slurm's controller: jobs (for the ledger's reconcile) and node drain/resume.

Choose an adapter with :func:`select_adapter` (``cli``, the default, or ``pyslurm``); every
adapter implements :class:`SlurmAdapter` and returns :class:`JobInfo` records. Importing this
package is cheap: an adapter's module is imported only when it is selected.
"""

from .base import JobInfo, SlurmAdapter, SlurmError, adapters, register, select_adapter

__all__ = ["JobInfo", "SlurmAdapter", "SlurmError", "adapters", "register", "select_adapter"]

"""``gpuarbd``, the node daemon, and the request handlers it shares with the hooks' fallback.

* :mod:`.handlers` — :class:`~.handlers.Handlers`: one handler per protocol op (the hooks' in-process
  fallback uses it directly when the daemon is down or hung);
* :mod:`.jobs` — how a Slurm job's allocation becomes a lease (GRES indices → GPUs, size, exports);
* :mod:`.reconcile` — the ledger's reconcile with Slurm and per-lease usage sampling;
* :mod:`.server` — the Unix-socket server and the ``gpuarbd`` command (``main``).

Nothing is imported here: a hook that falls back imports only what it uses.
"""

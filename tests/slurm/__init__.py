"""The ``slurm`` tier (a package so the test modules can import the cluster helpers from conftest)."""

"""The runner: `pyth-on up` starts the whole mesh on one machine and keeps it running."""

"""The entry point: the ``antifraud`` command line and the wiring of every mode (bootstrap)."""

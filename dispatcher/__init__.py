"""Anti-fraud alert dispatcher: call warnings in, door-knock dispatches out."""

__version__ = "0.1.0"

"""gkd-pipeline library: everything that is not a long-running process (see ARCHITECTURE.md)."""

__version__ = "0.1.0"

"""data_checks layer (see docs/ARCHITECTURE.md)."""

"""flows layer (see docs/ARCHITECTURE.md)."""

"""The kafka adapter (in progress)."""

"""The redis adapter (in progress)."""

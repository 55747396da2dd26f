"""The rocketmq adapter (in progress)."""

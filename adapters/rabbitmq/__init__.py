"""The rabbitmq adapter (in progress)."""

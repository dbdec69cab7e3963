"""The engine: building launches, processes, health, logs and the lifecycle."""

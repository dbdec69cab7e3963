"""llama-orch: a Docker-style process supervisor for llama.cpp's llama-server."""

__version__ = "0.1.0"

"""The router: an OpenAI-compatible proxy to healthy instances (DESIGN §6)."""

"""The front door: OpenAI-compatible HTTP server, metrics, (later) length prediction and dispatch policy."""

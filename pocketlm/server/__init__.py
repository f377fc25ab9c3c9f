"""The HTTP server: OpenAI-compatible routes, continuous batching and a web chat page."""

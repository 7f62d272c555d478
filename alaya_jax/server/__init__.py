"""``alaya serve``: an OpenAI-compatible HTTP server (``app``) over one engine loop with
continuous batching (``scheduler``), request validation (``protocol``) and Prometheus
metrics (``metrics``)."""

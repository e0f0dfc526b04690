"""Serving: an OpenAI-compatible HTTP API over fine-tuned runs.

``app.create_app(ServeConfig(...))`` builds the FastAPI app; ``domaintune serve`` runs it with
uvicorn. The pieces, one concern each: ``pool`` (bases loaded once, adapters attached to them),
``generation`` (one batched generate over rows of different adapters), ``batcher`` (gathers
concurrent requests into such batches), ``auth`` (hashed API keys, scopes, rate limits),
``feedback`` (ratings and corrections for the update loop), ``reload`` (follows the registry),
``metrics`` (Prometheus), ``errors`` (OpenAI's error JSON).
"""

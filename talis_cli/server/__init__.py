"""`talis serve`: the OpenAI-compatible HTTP API over the engine's Scheduler (FastAPI, uvicorn).

app.py (routes, the front door, streaming), schemas.py (request bodies), errors.py (OpenAI-shaped errors),
metrics.py (Prometheus), run.py (bind, load, serve, drain). The engine never imports this package.
"""

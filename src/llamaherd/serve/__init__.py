"""`herd serve`: an OpenAI-compatible HTTP API (FastAPI + uvicorn) over the generation engine.

Modules: protocol (request bodies and OpenAI's error body), runner (the engine's own thread), app (`create_app`,
the routes), cli (the `herd serve` command).
"""

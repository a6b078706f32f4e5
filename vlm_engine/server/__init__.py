"""`vlm-engine serve`: the OpenAI API over one `AsyncEngine` (FastAPI + uvicorn, the `serve`
extra). `app.py` builds the app, `main.py` runs it, `options.py` is its command line."""

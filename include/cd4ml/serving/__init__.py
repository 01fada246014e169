"""The prediction service (FastAPI): serves every model's champion, swaps versions without downtime."""

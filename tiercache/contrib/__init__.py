"""Framework integrations (Django cache backend, Starlette/FastAPI HTTP caching), each imported on use."""

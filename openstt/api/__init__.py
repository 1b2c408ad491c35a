"""The HTTP and WebSocket API (the API process): the FastAPI app, its routes, forms, admission
and errors. The top layer: it imports everything below, nothing imports it."""

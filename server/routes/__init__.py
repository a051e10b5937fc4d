"""The HTTP and websocket routes, one module per area; `create_app` includes them."""

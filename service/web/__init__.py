"""The web layer: the app factory, routes, request schemas and validation, errors, OpenAPI, Server-Sent
Events, API keys, security headers, metrics, static pages and the Gunicorn configuration. It turns HTTP
requests into engine jobs (charrnn.service.engine) and their characters into answers."""

"""The service: the generation engine (engine/), the web layer over it (http/), the settings both read
(config.py) and a small HTTP client (client.py)."""

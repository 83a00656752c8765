"""The HTTP endpoints, one blueprint per concern."""

from __future__ import annotations

from flask import Flask

from charrnn.service.web.routes import admin, chat, docs, generate, info, inspect, openai_api, scoring


def register_blueprints(app: Flask) -> None:
    """Attach every blueprint to `app`."""
    for blueprint in (generate.bp, inspect.bp, scoring.bp, info.bp, docs.bp, openai_api.bp, chat.bp, admin.bp):
        app.register_blueprint(blueprint)

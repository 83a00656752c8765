"""The HTTP service: app factory, routes, request schemas, errors and the generation engine it owns."""

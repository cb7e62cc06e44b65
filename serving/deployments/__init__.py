"""Ray Serve deployments: the three model stages, the Director that drives jobs through
them, and the Gateway ingress. Model code stays in `serving.pipeline`; HTTP in `serving.api`."""

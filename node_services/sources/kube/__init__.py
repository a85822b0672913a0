"""Kubernetes: translation of API objects into records (list/watch arrives with issue 4)."""

"""Rancher Cattle v2-beta: translation of API resources into records."""

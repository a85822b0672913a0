"""Metadata HTTP service, rancher-metadata compatible (issue 5)."""

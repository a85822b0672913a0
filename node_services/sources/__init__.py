"""Sources feed the state store: Kubernetes, Cattle and snapshot files."""

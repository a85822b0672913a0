"""CNI IPAM plugin, its store and the daemon-side reconciler (issue 6)."""

"""DNS server: Kubernetes DNS specification and Rancher names (issue 3)."""

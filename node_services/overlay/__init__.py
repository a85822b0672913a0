"""Overlay between nodes: VXLAN and host-gw."""

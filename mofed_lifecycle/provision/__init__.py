"""Putting the driver onto the node: precompiled, built here (sources), or by the DTK sidecar."""

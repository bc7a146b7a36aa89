"""mofed-lifecycle: owns the NVIDIA/Mellanox NIC driver (MOFED/DOCA) lifecycle on a node."""

__version__ = "0.1.0"

"""`mofed-lifecycle doctor`: node misconfigurations that break the NIC driver or RDMA."""

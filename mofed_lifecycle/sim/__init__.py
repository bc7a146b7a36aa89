"""The simulated node: a directory standing in for `/`, and a kernel process that gives it life."""

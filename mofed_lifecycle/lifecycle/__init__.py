"""The driver lifecycle: states, decisions, journal and the runner that drives them."""

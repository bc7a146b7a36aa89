"""The node, behind narrow typed interfaces: the only code that touches the host."""

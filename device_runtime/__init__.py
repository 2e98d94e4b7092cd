"""What runs on a node: the reference interpreter, the C runtime and firmware, the node agent."""

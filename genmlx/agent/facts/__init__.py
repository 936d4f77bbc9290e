"""What this node is: memory, chip, network interfaces and Thunderbolt links (``collect``), read
through a small platform seam (``platform``, with ``linux`` and ``macos``).
"""

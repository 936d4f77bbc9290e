"""Verifying this node's Thunderbolt links (``verify``): reachability, round trip and bandwidth
towards the peer at the other end of a planned /30, and the last verdict of each."""

"""The typed documents that cross process boundaries: what an agent reports (``agent_state``) and
what it is asked to do. Frozen dataclasses and their JSON form; no I/O. Above ``genmlx.core`` only.
"""

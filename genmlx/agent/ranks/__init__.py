"""Dispatcher ranks this agent runs: launch requests (``launch_request``), one process group per
rank started, watched and stopped (``supervisor``), and their logs (``logs``).
"""

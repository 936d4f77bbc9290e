"""The bottom layer, shared by every process: the error tree (``errors``), the HTTP handler base
(``http``), paths and the cluster token (``home``), zeroconf names (``mdns``) and the git revision of
a file (``gitrev``). It imports nothing else from GenMLX.
"""

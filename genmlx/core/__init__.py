"""The bottom layer, shared by every process: the error tree (``errors``), the HTTP handler base
(``http``), paths and the cluster token (``home``), signed requests and replies (``signing``),
zeroconf names and interface addresses (``mdns``) and a blocking call
awaited from the event loop (``threads``). It imports nothing else from GenMLX.
"""

"""What the node is doing, second by second: CPU, memory, GPU load and power, each storage path's
free space and disk I/O, each network interface's throughput (``sampler``; the GPU through macmon
, ioreg or NVML, ``gpu``). The last five minutes are kept in memory and served at
``GET /api/v1/telemetry`` (``genmlx.wire.telemetry``).
"""

"""A free port on this node. A module of its own that imports nothing heavy: the Ray task that
runs `free_port` inside rank 0's bundle imports only this module in its worker (from
`services.runtime.actors` it imported torch: about 2 s of CPU at every job's start)."""

from __future__ import annotations

import socket


def free_port() -> tuple[str, int]:
    import ray

    ip = ray.util.get_node_ip_address()
    with socket.socket() as s:
        s.bind(("", 0))
        return ip, s.getsockname()[1]

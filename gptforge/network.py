"""Whether a download can start: one bounded check that a host answers, asked before a library tries.

Libraries that download (huggingface_hub, tiktoken through requests) wait on the system's DNS and
connection timeouts and retries when there is no network: 10-15 s before an error, and then an error
in their own words. `reachable` answers in at most `timeout` seconds, so an offline user hears in our
words, at once, what was tried and what to do instead.
"""

from __future__ import annotations

import socket
import threading
import urllib.request

CHECK_TIMEOUT_S = 2.0


def _behind_proxy(host: str) -> bool:
    """A proxy is configured for this host: only the proxy can say whether the host is reachable."""
    proxies = urllib.request.getproxies()
    return bool(proxies.get("https") or proxies.get("all")) and not urllib.request.proxy_bypass(host)


def reachable(host: str, port: int = 443, timeout: float = CHECK_TIMEOUT_S) -> bool:
    """True when a TCP connection to host:port opens within `timeout` seconds (or a proxy is set, which we
    cannot judge: the library then tries through it). Name resolution has no timeout of its own, so the
    probe runs in a daemon thread and an unanswered lookup counts as unreachable."""
    if _behind_proxy(host):
        return True
    answer: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                answer.append(True)
        except OSError:  # unknown name, refused, unreachable network, timed out
            answer.append(False)

    thread = threading.Thread(target=probe, name=f"reachable:{host}", daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answer) and answer[0]

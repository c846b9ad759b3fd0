"""`uembed serve` as a real process: SIGTERM while requests are in flight answers all of them, exit 0."""

from __future__ import annotations

import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.service_helpers import free_port, photo, start_serve


def _in_flight(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return float(re.search(r"^uembed_requests_in_flight ([0-9.]+)$", text, re.M).group(1))


@pytest.mark.slow
def test_sigterm_answers_every_request_in_flight_then_exits_0(tiny_artifact: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_serve(str(tiny_artifact), port, "--max-batch-size", "2", "--max-wait-ms", "1", "--decode-threads",
                       "1", "--drain-timeout-s", "30", "--log-level", "warning")
    try:
        # 24 requests x 6 large JPEGs: seconds of decoding on one decode thread.
        payloads = [[("image", (f"{i}-{j}.jpg", photo(i * 10 + j, size=(1024, 768)), "image/jpeg"))
                     for j in range(6)] for i in range(24)]
        client = httpx.Client(timeout=60, limits=httpx.Limits(max_connections=32))
        with ThreadPoolExecutor(24) as pool:
            futures = [pool.submit(client.post, f"{url}/embed?output=binary", files=p) for p in payloads]
            # The count that let the loop end is the one asserted: a second /metrics read could
            # already see fewer, as requests keep finishing until the signal lands.
            while (in_flight := _in_flight(url)) < 12:
                assert not all(f.done() for f in futures), "everything finished before SIGTERM could be sent"
                time.sleep(0.01)
            proc.send_signal(signal.SIGTERM)
            unanswered_at_sigterm = sum(not f.done() for f in futures)
            codes = [f.result().status_code for f in futures]
        client.close()
        assert in_flight >= 12
        assert unanswered_at_sigterm >= 1, "every request was answered before SIGTERM landed"
        assert codes == [200] * 24
        assert proc.wait(timeout=60) == 0
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/healthz", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
        out = proc.communicate()[0]
    assert "Traceback" not in out, out[-3000:]

"""Locust load test for a uembed deployment.

    .venv/bin/locust -f loadtest/locustfile.py --config loadtest/locust.conf --host http://SERVICE:PORT

Users POST real photos (loadtest/photos: JPEGs from 160 to 1000 px) to /embed as raw bodies and as
multipart with 1-3 images, asking for float, binary or both, and check every answer: status 200, one
embedding per image, `dim` floats of unit norm, a binary code of ceil(dim / 8) bytes. The server's
own X-Queue-Time / X-Inference-Time headers are recorded as extra rows (type SERVER) next to the
client-side times. The load follows a step shape (--step-users per --step-seconds up to --users; 0:
constant --users). At the end an SLO gate compares the /embed requests with --slo-failure-ratio,
--slo-p95-ms and --slo-p99-ms and makes locust exit 1 on a breach (the reason is logged and printed).
"""

from __future__ import annotations

import base64
import logging
import math
import os
import random
from pathlib import Path

from locust import FastHttpUser, LoadTestShape, between, events, task
from locust.runners import WorkerRunner
from locust.stats import StatsEntry

log = logging.getLogger("uembed.loadtest")
DEFAULT_PHOTOS = Path(__file__).resolve().parent / "photos"
OUTPUTS = ("both", "both", "float", "binary")


@events.init_command_line_parser.add_listener
def _add_arguments(parser) -> None:
    g = parser.add_argument_group("uembed")
    g.add_argument("--photos", default=str(DEFAULT_PHOTOS), help="folder of .jpg/.png/.webp/.avif/.heic photos to POST")
    g.add_argument("--step-users", type=int, default=0, help="users added per step (0: constant --users)")
    g.add_argument("--step-seconds", type=float, default=30.0, help="seconds per step")
    g.add_argument("--slo-failure-ratio", type=float, default=0.01, help="largest failed share of /embed requests")
    g.add_argument("--slo-p95-ms", type=float, default=500.0, help="largest p95 of /embed requests, ms")
    g.add_argument("--slo-p99-ms", type=float, default=1000.0, help="largest p99 of /embed requests, ms")
    g.add_argument("--multipart-max", type=int, default=3, help="most images in one multipart request")


_photos: list[tuple[str, bytes, str]] = []


@events.test_start.add_listener
def _load_photos(environment, **_kw) -> None:
    folder = Path(environment.parsed_options.photos)
    types = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp",
             ".avif": "image/avif", ".heic": "image/heic"}
    _photos[:] = [(p.name, p.read_bytes(), types[p.suffix.lower()]) for p in sorted(folder.iterdir())
                  if p.suffix.lower() in types]
    if not _photos:
        raise RuntimeError(f"no photos in {folder}")


class EmbedUser(FastHttpUser):
    wait_time = between(0.0, 0.05)
    dim = 0

    def on_start(self) -> None:
        with self.client.get("/v1/model", name="/v1/model", catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"/v1/model: HTTP {r.status_code}")
                self.dim = 0
                return
            self.dim = int(r.json()["dim"])

    def _check(self, r, images: int, output: str) -> None:
        if r.status_code != 200:
            r.failure(f"HTTP {r.status_code}: {(r.text or '')[:200]}")
            return
        try:
            body = r.json()
            embs = body["embeddings"]
            if len(embs) != images:
                raise ValueError(f"{len(embs)} embeddings for {images} images")
            dim = self.dim or int(body["dim"])
            for e in embs:
                if output in ("float", "both"):
                    vec = e["float"]
                    if len(vec) != dim:
                        raise ValueError(f"float length {len(vec)} != dim {dim}")
                    norm = math.sqrt(sum(v * v for v in vec))
                    if abs(norm - 1.0) > 1e-3:
                        raise ValueError(f"float norm {norm:.5f}")
                if output in ("binary", "both") and len(base64.b64decode(e["binary"])) != (dim + 7) // 8:
                    raise ValueError(f"binary code is not {(dim + 7) // 8} bytes")
                if (output == "float" and "binary" in e) or (output == "binary" and "float" in e):
                    raise ValueError(f"output={output} returned both codes")
        except (ValueError, KeyError, TypeError) as exc:
            r.failure(f"bad answer: {exc}")
            return
        r.success()
        self._server_times(r)

    def _server_times(self, r) -> None:
        for header, name in (("X-Queue-Time", "queue wait"), ("X-Inference-Time", "inference")):
            value = r.headers.get(header)
            if value is not None:
                events.request.fire(request_type="SERVER", name=name, response_time=float(value),
                                    response_length=0, exception=None, context={})

    @task(3)
    def raw_body(self) -> None:
        _, data, ctype = random.choice(_photos)
        output = random.choice(OUTPUTS)
        with self.client.post(f"/embed?output={output}", data=data, headers={"Content-Type": ctype},
                              name=f"/embed raw {output}", catch_response=True) as r:
            self._check(r, 1, output)

    @task(1)
    def multipart(self) -> None:
        n = random.randint(1, max(1, self.environment.parsed_options.multipart_max))
        picks = random.sample(_photos, min(n, len(_photos)))
        output = random.choice(OUTPUTS)
        boundary = f"uembed{random.getrandbits(64):016x}"
        parts = []
        for name, data, ctype in picks:
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
                         f"Content-Type: {ctype}\r\n\r\n".encode() + data + b"\r\n")
        body = b"".join(parts) + f"--{boundary}--\r\n".encode()
        with self.client.post(f"/embed?output={output}", data=body,
                              headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
                              name=f"/embed multipart {output}", catch_response=True) as r:
            self._check(r, len(picks), output)


class StepLoadShape(LoadTestShape):
    """--step-users more users every --step-seconds, up to --users; --step-users 0 keeps --users.
    --run-time ends the test (headless locust waits for the shape, so the shape itself stops it)."""

    use_common_options = True

    def tick(self):
        opts = self.runner.environment.parsed_options
        if opts.run_time and self.get_run_time() >= opts.run_time:
            return None
        users = opts.num_users or 1
        if opts.step_users > 0:
            users = min(users, opts.step_users * (int(self.get_run_time() // opts.step_seconds) + 1))
        return users, opts.spawn_rate or users


def embed_summary(stats) -> StatsEntry:
    """All /embed requests (client-side times) as one entry."""
    total = StatsEntry(stats, "/embed (all)", "POST")
    for entry in stats.entries.values():
        if entry.method == "POST" and entry.name.startswith("/embed"):
            total.extend(entry)
    return total


def slo_breaches(total: StatsEntry, failure_ratio: float, p95_ms: float, p99_ms: float) -> list[str]:
    if total.num_requests == 0:
        return ["no /embed requests were made"]
    out = []
    if total.fail_ratio > failure_ratio:
        out.append(f"failure ratio {total.fail_ratio:.4f} > {failure_ratio}")
    p95, p99 = total.get_response_time_percentile(0.95), total.get_response_time_percentile(0.99)
    if p95 > p95_ms:
        out.append(f"p95 {p95:.0f} ms > {p95_ms:.0f} ms")
    if p99 > p99_ms:
        out.append(f"p99 {p99:.0f} ms > {p99_ms:.0f} ms")
    return out


@events.quitting.add_listener
def _slo_gate(environment, **_kw) -> None:
    if environment.parsed_options is None or isinstance(environment.runner, WorkerRunner):
        return  # workers report to the master, which applies the gate
    o = environment.parsed_options
    total = embed_summary(environment.runner.stats)
    breaches = slo_breaches(total, o.slo_failure_ratio, o.slo_p95_ms, o.slo_p99_ms)
    line = (f"SLO gate: {total.num_requests} /embed requests, {total.num_failures} failed, "
            f"{total.total_rps:.1f} req/s, p50 {total.get_response_time_percentile(0.5):.0f} ms, "
            f"p95 {total.get_response_time_percentile(0.95):.0f} ms, "
            f"p99 {total.get_response_time_percentile(0.99):.0f} ms")
    if breaches:
        environment.process_exit_code = 1
        line += " -- FAILED: " + "; ".join(breaches)
    else:
        line += f" -- passed (failure ratio <= {o.slo_failure_ratio}, p95 <= {o.slo_p95_ms:.0f} ms, " \
                f"p99 <= {o.slo_p99_ms:.0f} ms)"
    log.info(line)
    print(line, flush=True)
    if os.environ.get("UEMBED_SLO_REPORT"):
        Path(os.environ["UEMBED_SLO_REPORT"]).write_text(line + "\n")

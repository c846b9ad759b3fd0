"""`uembed serve` settings: invalid combinations are refused at start with one line naming them,
and every setting is also read from its UEMBED_ environment variable."""

from __future__ import annotations

import pytest

from service.config import Settings
from service.server import build_settings
from uembed.errors import UserError


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"max_batch_size": 32, "max_queue_images": 16}, "max_queue_images (16) must be >= max_batch_size (32)"),
        ({"max_image_bytes": 2 << 20, "max_request_bytes": 1 << 20}, "max_image_bytes must be <= max_request_bytes"),
        ({"max_request_bytes": 512 << 20}, "max_request_bytes must be <= max_body_bytes_in_flight"),
        ({"request_timeout_ms": 90_000}, "request_timeout_ms must be <= max_request_timeout_ms"),
        ({"max_body_bytes_in_flight": 10}, "max_body_bytes_in_flight: Input should be greater than or equal to 1024"),
        ({"backend": "tensorflow"}, "backend: Input should be"),
    ],
)
def test_invalid_settings_are_refused_in_one_line(overrides: dict, message: str) -> None:
    with pytest.raises(UserError, match=r"^invalid settings: ") as err:
        build_settings(overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UEMBED_MAX_BODY_BYTES_IN_FLIGHT", str(1 << 30))
    monkeypatch.setenv("UEMBED_MAX_REQUEST_BYTES", str(128 << 20))
    monkeypatch.setenv("UEMBED_BODY_TIMEOUT_S", "5")
    s = Settings()
    assert (s.max_body_bytes_in_flight, s.max_request_bytes, s.body_timeout_s) == (1 << 30, 128 << 20, 5.0)
    assert Settings.model_fields["max_body_bytes_in_flight"].description  # the --help text

import httpx
import pytest

from llama_orchestrator.engine import health
from llama_orchestrator.engine.status import observed_state
from llama_orchestrator.errors import UserError
from llama_orchestrator.states import InstanceState as S
from llama_orchestrator.timefmt import human_duration, parse_since


@pytest.mark.parametrize(
    ("status", "refused", "expected"),
    [(200, False, "healthy"), (503, False, "loading"), (500, False, "error"),
     (None, True, "down"), (None, False, "error")],
)
def test_classify(status, refused, expected):
    assert health.classify(status, refused) == expected


def test_probe_uses_the_given_client_and_loopback_for_wildcards():
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(503, text='{"error":"Loading model"}')

    with httpx.Client(transport=httpx.MockTransport(handler)) as client:
        r = health.probe(client, "0.0.0.0", 8001, 1.0)
    assert seen == ["http://127.0.0.1:8001/health"]
    assert r.status == "loading" and r.http_status == 503 and not r.ok


def test_probe_reports_a_timeout_as_error():
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    with httpx.Client(transport=httpx.MockTransport(handler)) as client:
        r = health.probe(client, "127.0.0.1", 1, 0.1)
    assert r.status == "error" and "ReadTimeout" in (r.error or "")


@pytest.mark.parametrize(
    ("current", "status", "expected"),
    [(S.STARTING, "healthy", S.HEALTHY), (S.STARTING, "loading", S.STARTING),
     (S.STARTING, "down", S.STARTING), (S.STARTING, "error", S.UNHEALTHY),
     (S.HEALTHY, "loading", S.UNHEALTHY), (S.UNHEALTHY, "healthy", S.HEALTHY)],
)
def test_observed_state_from_one_probe(current, status, expected):
    p = health.ProbeResult(status, 200 if status == "healthy" else None, 1.0)
    assert observed_state(current, p) == expected


def test_parse_since():
    assert parse_since("10m", 1000.0) == 400.0
    assert parse_since("1h30m", 10000.0) == 10000.0 - 5400
    assert parse_since("2026-11-22T06:00:00+00:00", 0) == 1795327200.0
    with pytest.raises(UserError, match="neither a duration nor a time"):
        parse_since("yesterday", 0)


def test_human_duration():
    assert [human_duration(s) for s in (None, 5, 130, 3720, 90000)] == ["-", "5s", "2m10s", "1h02m", "1d1h"]

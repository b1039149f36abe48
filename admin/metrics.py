"""``GET /metrics``: Prometheus metrics of the data plane running in this process, on the admin port.

The figures come from :class:`trioproxy.metrics.Metrics` (``RunningGateway.metrics``, fed once per request by
the forwarder) and from the gateway's current state, read at scrape time (:class:`trioproxy.metrics.StateCollector`).
With ``serve --workers N`` the admin API runs in worker 0 and gathers every worker's figures through the
supervisor: counters and histograms are summed (:mod:`trioproxy.worker_reports`).

Access: Prometheus cannot hold a 15-minute JWT, so the route does not take one. With ``metrics_token`` set
(``TRIOPROXY_METRICS_TOKEN``) a scraper must send it as ``Authorization: Bearer <token>`` (Prometheus'
``bearer_token``), compared in constant time; without it the route is public, like ``/api/health``. Either way
the exposition holds aggregates only: labels are routes, statuses, outcomes, provider kinds, token kinds and key
states; no key, user, model, address or secret ever appears (see :mod:`trioproxy.metrics`). Keep the admin port
off the public network, as it is by default (127.0.0.1).
"""

from __future__ import annotations

import hmac
from typing import Any, ClassVar

from prometheus_client.exposition import CONTENT_TYPE_LATEST
from quart import Blueprint, Response, request
from quart_schema import document_response, tag

from admin.errors import unauthorized
from admin.rbac import Access, requires
from admin.schemas import Output
from admin.state import gather_reports, get_state
from trioproxy.metrics import Metrics
from trioproxy.worker_reports import merge_metric_families, render_families

bp = Blueprint("metrics", __name__)


class PrometheusText(Output):
    """Prometheus text exposition format (documented as text/plain, see ``admin.app._OpenAPI``)."""

    openapi_response: ClassVar[dict[str, Any]] = {
        "description": "Prometheus text exposition format",
        "content": {"text/plain": {"schema": {"type": "string"}}},
    }


@bp.get("/metrics")
@requires(Access.PUBLIC)
@tag(["operations"])
@document_response(PrometheusText)
async def metrics() -> Response:
    """Prometheus metrics of the proxy (text exposition format; the metrics token when one is configured).

    Requests by route, status and outcome; latency and time-to-first-byte histograms; tokens by kind; cost;
    upstream errors; connection pool sizes; requests in flight; provider key states and balancer state
    transitions; the metering queue and spool. Aggregates only."""
    state = get_state()
    expected = state.settings.metrics_token
    if expected:
        presented = request.headers.get("authorization", "")
        if not hmac.compare_digest(presented.encode(), f"Bearer {expected}".encode()):
            raise unauthorized("send the metrics token as a bearer token")
    gateway = state.gateway
    if gateway is None:
        # Without a proxy in this process there is nothing to count but the version (a fresh, empty registry).
        body = Metrics().render()
    else:
        body = render_families(merge_metric_families(await gather_reports(gateway, "metrics")))
    return Response(body, status=200, content_type=CONTENT_TYPE_LATEST)

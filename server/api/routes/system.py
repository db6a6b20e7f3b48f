"""Health and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from sqlalchemy import text

from server.api.deps import ERRORS, AdminDep, DbDep, MetricsDep

router = APIRouter(tags=["system"], responses=ERRORS)


@router.get("/healthz")
def healthz(db: DbDep) -> dict[str, str]:
    """``{"status": "ok"}`` when the server answers and its database does."""
    db.exec(text("SELECT 1"))  # type: ignore[call-overload]
    return {"status": "ok"}


@router.get("/metrics", response_class=Response)
def metrics(_who: AdminDep, m: MetricsDep) -> Response:
    """Prometheus text format (scrape with an admin token as ``bearer_token``)."""
    return Response(m.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

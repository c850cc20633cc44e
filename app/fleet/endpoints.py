from __future__ import annotations

from fastapi import APIRouter

from app.core.deps import ServicesDep, SessionDep
from app.fleet import service
from app.fleet.schemas import CapabilitiesOut

router = APIRouter(tags=["workers"])


@router.get("/capabilities", response_model=CapabilitiesOut,
            summary="Which format x method x device combinations the live workers support")
def get_capabilities(services: ServicesDep, session: SessionDep):
    return service.capabilities(session, services.settings.worker_lost_after_s)

"""The FastAPI dependencies of the routes: this process's `Services` and a database session for the request.

The session lives as long as the request and is closed after it; it is never committed here: the domain service
that carries out a write commits it (the rule, and its two stepwise exceptions, are in app/core/services.py).
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from app.core.openapi import answers
from app.core.services import Services


@answers(503)  # every route that reaches the database can find it unavailable
async def get_services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]


def get_session(services: ServicesDep) -> Iterator[Session]:
    with services.db.session() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]

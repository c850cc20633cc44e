from __future__ import annotations

from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Header, Path
from fastapi.responses import Response, StreamingResponse

from app.artifacts import service
from app.artifacts.schemas import ArtifactOut
from app.auth.deps import PrincipalDep
from app.core.deps import ServicesDep, SessionDep
from app.core.errors import NotFound, error_responses
from app.core.ids import ID_PATTERN

router = APIRouter(tags=["artifacts"])
ArtifactId = Path(pattern=ID_PATTERN, description="An artifact id.")


def content_disposition(filename: str) -> str:
    """An ASCII filename for every client (curl -J) plus the exact UTF-8 one (RFC 6266)."""
    ascii_name = "".join(c if c.isascii() and c.isprintable() and c not in '"\\/' else "_" for c in filename)
    return f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(filename)}"



@router.get("/artifacts/{artifact_id}", response_model=ArtifactOut, responses=error_responses(NotFound))
def get_artifact(session: SessionDep, who: PrincipalDep, artifact_id: str = ArtifactId):
    return service.to_out(service.get(session, who.scope, artifact_id))


@router.get("/artifacts/{artifact_id}/content", response_class=StreamingResponse,
            responses={**error_responses(NotFound, service.RangeNotSatisfiable),
                       200: {"content": {"application/octet-stream": {}}, "description": "The file."},
                       206: {"content": {"application/octet-stream": {}}, "description": "The requested range."},
                       304: {"description": "Not modified (If-None-Match matched the ETag)."}},
            summary="Download (streamed; ETag = sha256; Range supported)")
def download_artifact(services: ServicesDep, session: SessionDep, who: PrincipalDep, artifact_id: str = ArtifactId,
                      range_: Annotated[str | None, Header(alias="Range", max_length=200)] = None,
                      if_none_match: Annotated[str | None, Header(max_length=200)] = None):
    row = service.get(session, who.scope, artifact_id)
    service.check_content(services.storage, row)
    etag = f'"{row.sha256}"'
    headers = {"ETag": etag, "Accept-Ranges": "bytes",
               "Content-Disposition": content_disposition(row.filename)}
    if if_none_match and etag in [t.strip() for t in if_none_match.split(",")]:
        return Response(status_code=304, headers=headers)
    size = row.size_bytes
    rng = service.parse_range(range_, size)
    start, end = rng or (0, size - 1)
    headers["Content-Length"] = str(end - start + 1)
    if rng:
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    return StreamingResponse(services.storage.iter_range(row.sha256, start, end), status_code=206 if rng else 200,
                             media_type="application/octet-stream", headers=headers)

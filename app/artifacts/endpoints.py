from __future__ import annotations

from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Header, Path
from fastapi.responses import Response, StreamingResponse

from app.artifacts import service
from app.artifacts.schemas import ArtifactOut
from app.artifacts.verify import ArtifactCorrupted, open_verified
from app.auth.deps import PrincipalDep
from app.core.deps import ServicesDep, SessionDep
from app.core.errors import NotFound, error_responses
from app.core.ids import ID_PATTERN
from app.core.storage import iter_file

router = APIRouter(tags=["artifacts"])
ArtifactId = Path(pattern=ID_PATTERN, description="An artifact id.")


def content_disposition(filename: str) -> str:
    """An ASCII filename for every client (curl -J) plus the exact UTF-8 one (RFC 6266)."""
    ascii_name = "".join(c if c.isascii() and c.isprintable() and c not in '"\\/' else "_" for c in filename)
    return f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(filename)}"



@router.get("/artifacts/{artifact_id}", response_model=ArtifactOut, responses=error_responses(NotFound))
def get_artifact(session: SessionDep, who: PrincipalDep, artifact_id: str = ArtifactId):
    return service.to_out(service.get(session, who.scope, artifact_id))


_DOWNLOAD_RESPONSES = {**error_responses(NotFound, service.ContentMissing, service.RangeNotSatisfiable,
                                         ArtifactCorrupted),
                       200: {"content": {"application/octet-stream": {}}, "description": "The file."},
                       206: {"content": {"application/octet-stream": {}}, "description": "The requested range."},
                       304: {"description": "Not modified (If-None-Match matched the ETag)."}}


def _download(services, session, who, artifact_id: str, range_: str | None, if_none_match: str | None,
              *, head: bool) -> Response:
    row = service.get(session, who.scope, artifact_id)
    session.close()  # the row is loaded; no database connection is held while hashing or streaming
    service.check_content(services.storage, row)
    etag = f'"{row.sha256}"'
    headers = {"ETag": etag, "Accept-Ranges": "bytes",
               "Content-Disposition": content_disposition(row.filename)}
    if if_none_match and etag in [t.strip() for t in if_none_match.split(",")]:
        return Response(status_code=304, headers=headers)  # the client's copy is the recorded content
    size = row.size_bytes
    rng = service.parse_range(range_, size)
    start, end = rng or (0, size - 1)
    # checked against the recorded sha256 before any byte (or a HEAD's headers) goes out; streamed from that file
    try:
        f = open_verified(services.storage, row.id, row.sha256, size)
    except FileNotFoundError:  # removed since check_content
        raise service.ContentMissing(f"the content of artifact {row.id} is no longer in storage") from None
    headers["Content-Length"] = str(end - start + 1)
    if rng:
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    status = 206 if rng else 200
    if head:
        f.close()
        return Response(status_code=status, media_type="application/octet-stream", headers=headers)
    return StreamingResponse(iter_file(f, start, end), status_code=status, media_type="application/octet-stream",
                             headers=headers)


@router.get("/artifacts/{artifact_id}/content", response_class=StreamingResponse, responses=_DOWNLOAD_RESPONSES,
            summary="Download (streamed; ETag = sha256; Range supported; verified against the sha256 first)")
def download_artifact(services: ServicesDep, session: SessionDep, who: PrincipalDep, artifact_id: str = ArtifactId,
                      range_: Annotated[str | None, Header(alias="Range", max_length=200)] = None,
                      if_none_match: Annotated[str | None, Header(max_length=200)] = None):
    return _download(services, session, who, artifact_id, range_, if_none_match, head=False)


@router.head("/artifacts/{artifact_id}/content", response_class=Response, responses=_DOWNLOAD_RESPONSES,
             summary="The download's headers, after the same checks (no body)")
def head_artifact(services: ServicesDep, session: SessionDep, who: PrincipalDep, artifact_id: str = ArtifactId,
                  range_: Annotated[str | None, Header(alias="Range", max_length=200)] = None,
                  if_none_match: Annotated[str | None, Header(max_length=200)] = None):
    return _download(services, session, who, artifact_id, range_, if_none_match, head=True)

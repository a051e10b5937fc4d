"""The demo web page at `/`, its static files, and the database images it shows.

`GET /v1/places/{id}/image` serves the database image of a match (the page's
thumbnails). The path comes from the served index's own metadata and must
resolve to a file under the index's recorded root, so a crafted id or a
tampered metadata row can never read anything else from the disk.
"""

from __future__ import annotations

import mimetypes
from pathlib import Path

from fastapi import APIRouter
from fastapi import Path as PathParam
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from vpr.server.deps import RuntimeDep
from vpr.server.errors import NotFound
from vpr.server.runtime import Runtime

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"
MAX_ID = 2**62  # ids are SQLite int64; larger values would overflow the lookup

router = APIRouter()


def static_files() -> StaticFiles:
    """The page's assets, mounted at `/static`."""
    return StaticFiles(directory=STATIC_DIR)


@router.get("/", include_in_schema=False)
def page() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers={"Cache-Control": "no-cache"})


@router.get(
    "/v1/places/{place_id}/image",
    tags=["query"],
    summary="The database image of a place id",
    response_class=FileResponse,
    responses={
        200: {"content": {"image/jpeg": {}, "image/png": {}}},
        404: {"description": "no such id in the served index, or its file is gone"},
        503: {"description": "not ready"},
    },
)
def place_image(runtime: RuntimeDep, place_id: int = PathParam(ge=0, le=MAX_ID)) -> FileResponse:
    path = place_image_path(runtime, place_id)
    kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    # The URL does not name the index version: revalidate so a rebuild shows.
    return FileResponse(path, media_type=kind, headers={"Cache-Control": "no-cache"})


def place_image_path(runtime: Runtime, place_id: int) -> Path:
    """The image file of `place_id` in the served index; NotFound (or NotReady) otherwise."""
    with runtime.lease() as serving:
        index = serving.index
        meta = index.meta([place_id]).get(place_id)
        root = Path(index.root)
    if meta is None or not meta.get("path"):
        raise NotFound(f"no place with id {place_id} in the served index")
    root = root.resolve()
    path = (root / str(meta["path"])).resolve()
    if not path.is_relative_to(root):
        raise NotFound(f"the image of place {place_id} is outside the index root")
    if not path.is_file():
        raise NotFound(f"the image of place {place_id} is no longer on disk")
    return path

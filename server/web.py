"""The demo web page at `/`, its static files, and the database images it shows.

`GET /v1/places/{id}/image` serves the database image of a match (the page's
thumbnails). The path comes from the served index's own metadata and must
resolve to a file under the index's recorded root, so a crafted id or a
tampered metadata row can never read anything else from the disk.
"""

from __future__ import annotations

import mimetypes
from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi import Path as PathParam
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from vpr.server.inputs import ApiError
from vpr.server.runtime import NotReady, Runtime

STATIC_DIR = Path(__file__).resolve().parent / "static"
MAX_ID = 2**62  # ids are SQLite int64; larger values would overflow the lookup


def install_web(app: FastAPI, runtime: Runtime) -> None:
    """Add the page (`/`), its assets (`/static/...`) and the place image route."""
    app.include_router(web_router(runtime))
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")


def web_router(runtime: Runtime) -> APIRouter:
    router = APIRouter()

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
    def place_image(place_id: int = PathParam(ge=0, le=MAX_ID)) -> FileResponse:
        path = place_image_path(runtime, place_id)
        kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        # The URL does not name the index version: revalidate so a rebuild shows.
        return FileResponse(path, media_type=kind, headers={"Cache-Control": "no-cache"})

    return router


def place_image_path(runtime: Runtime, place_id: int) -> Path:
    """The image file of `place_id` in the served index; ApiError 404/503 otherwise."""
    try:
        with runtime.lease() as serving:
            index = serving.index
            meta = index.meta([place_id]).get(place_id)
            root = Path(index.root)
    except NotReady as e:
        raise ApiError(503, "not_ready", str(e), headers={"Retry-After": str(runtime.settings.retry_after_s)}) from None
    if meta is None or not meta.get("path"):
        raise ApiError(404, "not_found", f"no place with id {place_id} in the served index")
    root = root.resolve()
    path = (root / meta["path"]).resolve()
    if not path.is_relative_to(root):
        raise ApiError(404, "not_found", f"the image of place {place_id} is outside the index root")
    if not path.is_file():
        raise ApiError(404, "not_found", f"the image of place {place_id} is no longer on disk")
    return path

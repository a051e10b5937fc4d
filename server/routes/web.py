"""The demo web page at `/`, its static files, and the database images it shows.

`GET /v1/places/{id}/image` serves the database image of a match (the page's
thumbnails). Who may read it is a setting (`VPR_PLACE_IMAGES`): anyone
(`public`, the default, so that the page works out of the box), holders of
the admin token (`token`; the page's thumbnails then do not load), or nobody
(`off`: 404). Only a file that the served index's own metadata names is
served, and only when it resolves to a file under the index's recorded root
and under one of the data roots (`VPR_DATA_ROOTS`), so a crafted id, a
tampered metadata row or an index built from a folder elsewhere on the host
can never expose anything else from the disk.
"""

from __future__ import annotations

import mimetypes
from collections.abc import Sequence
from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi import Path as PathParam
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from vpr.server.deps import MetricsDep, RuntimeDep, SettingsDep
from vpr.server.errors import Forbidden, NotFound
from vpr.server.routes.admin import get_admin_token, require_admin
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


async def image_access(request: Request, settings: SettingsDep, metrics: MetricsDep) -> None:
    """The place-image route's access, as `VPR_PLACE_IMAGES` sets it."""
    if settings.place_images == "off":
        raise NotFound("place images are off on this server (VPR_PLACE_IMAGES=off)")
    if settings.place_images == "token":  # settings refuse `token` without an admin token
        await require_admin(request, get_admin_token(request), metrics)


@router.get(
    "/v1/places/{place_id}/image",
    tags=["query"],
    summary="The database image of a place id",
    description="Access: VPR_PLACE_IMAGES (public, token: the admin token, off: 404). Only files "
    "under the data roots (VPR_DATA_ROOTS) are served.",
    response_class=FileResponse,
    dependencies=[Depends(image_access)],
    responses={
        200: {"content": {"image/jpeg": {}, "image/png": {}}},
        401: {"description": "VPR_PLACE_IMAGES=token and a missing or wrong token"},
        403: {"description": "the image lies outside the data roots"},
        404: {"description": "no such id in the served index, its file is gone, or the route is off"},
        503: {"description": "not ready"},
    },
)
def place_image(runtime: RuntimeDep, settings: SettingsDep, place_id: int = PathParam(ge=0, le=MAX_ID)) -> FileResponse:
    path = place_image_path(runtime, place_id, settings.resolved_data_roots())
    kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    # The URL does not name the index version: revalidate so a rebuild shows.
    return FileResponse(path, media_type=kind, headers={"Cache-Control": "no-cache"})


def place_image_path(runtime: Runtime, place_id: int, roots: Sequence[Path]) -> Path:
    """The image file of `place_id` in the served index, if it lies under the
    index root and under one of `roots` (resolved); NotFound, Forbidden (or
    NotReady) otherwise. Messages name no path: the route may be public."""
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
    if not any(path.is_relative_to(Path(r).resolve()) for r in roots):
        raise Forbidden(
            f"the image of place {place_id} lies outside the data roots this server may serve from (VPR_DATA_ROOTS)"
        )
    if not path.is_file():
        raise NotFound(f"the image of place {place_id} is no longer on disk")
    return path

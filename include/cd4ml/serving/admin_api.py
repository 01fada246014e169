"""The prediction service's admin endpoints, behind the admin token (`CD4ML_SERVICE_ADMIN_TOKEN`).

`POST /admin/reload` checks MLflow now; `PUT /admin/models/<model>/staging` with `{"version": "7"}`
loads a version into the model's staging slot (not live traffic), `DELETE` drops it; a prediction
request with the header `x-cd4ml-slot: staging` and the token is answered by the staged version
(the deploy's smoke test before `champion` moves).
"""

from __future__ import annotations

import hmac
import json
from typing import TYPE_CHECKING

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from cd4ml.serving.models import ModelStore, Slot, StagingRefusedError
from cd4ml.serving.payload import Problem
from cd4ml.serving.payload import error_response as _error

if TYPE_CHECKING:
    from cd4ml.serving.workers import WorkerSync


class Admin:
    """`sync`: with several service processes, what one process does here every other one follows
    (`cd4ml.serving.workers`); a staging PUT answers once every process has the version staged."""

    def __init__(self, store: ModelStore, token: str | None, sync: WorkerSync | None = None) -> None:
        self.store, self.token, self.sync = store, token, sync

    def denied(self, request: Request) -> JSONResponse | None:
        """None when the request carries the admin token; else the 401 (or 403: no token set)."""
        if self.token is None:
            return _error(403, "admin actions are disabled: CD4ML_SERVICE_ADMIN_TOKEN is not set")
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            return _error(
                401, "admin token missing or wrong", [Problem("authorization", "Bearer token required")]
            )
        return None

    def staged_slot(self, request: Request, model: str, slot: str) -> Slot | JSONResponse:
        """The staged (not live) version of `model`, for the deploy's smoke test: admin token only."""
        if slot != "staging":
            return _error(400, f"header x-cd4ml-slot must be 'staging' (or absent), not {slot[:50]!r}",
                          [Problem("x-cd4ml-slot", "only 'staging' is a slot")])  # fmt: skip
        denied = self.denied(request)
        if denied is not None:
            return denied
        staged = self.store.candidates.staged.get(model)
        if staged is None:
            where = "" if model in self.store.known_models else f" (and model '{model}' is not served here)"
            return _error(404, f"no version of model '{model}' is staged{where}",
                          [Problem("x-cd4ml-slot", "nothing staged")])  # fmt: skip
        return staged

    def router(self) -> APIRouter:
        router = APIRouter()
        store = self.store

        @router.put("/admin/models/{model}/staging")
        async def stage(model: str, request: Request) -> JSONResponse:
            """Load a version into the model's staging slot (not live): body {"version": "<n>"}."""
            denied = self.denied(request)
            if denied is not None:
                return denied
            try:
                body = json.loads(await request.body() or b"null")
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                return _error(400, "body is not valid JSON", [Problem("body", f"invalid JSON: {err}")])
            version = body.get("version") if isinstance(body, dict) else None
            if not isinstance(version, (str, int)) or isinstance(version, bool) or not str(version).strip():
                return _error(422, 'body must be {"version": "<registered version>"}',
                              [Problem("version", "required: the registered version to stage")])  # fmt: skip
            # With several processes the others start loading it now, beside this one.
            stamp = (
                None
                if self.sync is None
                else self.sync.order("staging", model, {"version": str(version).strip()})
            )
            try:
                slot = await run_in_threadpool(store.candidates.stage, model, str(version).strip())
            except LookupError as err:
                return _error(404, str(err), [Problem("version", "not found")])
            except StagingRefusedError as err:
                return _error(422, f"model '{model}' version {version} refused: {err}",
                              [Problem("version", "refused: never served")])  # fmt: skip
            except Exception as err:  # noqa: BLE001 - MLflow unreachable: the caller may retry
                why = f"could not load model '{model}' version {version}: {type(err).__name__}: {err}"
                return _error(503, why)
            if self.sync is not None and stamp is not None:
                status, why = await self.sync.staged_everywhere(model, slot.version, stamp)
                if status != 200:
                    return _error(status, f"model '{model}' version {version} not staged everywhere: {why}",
                                  [Problem("version", "not staged by every service process")])  # fmt: skip
            return JSONResponse({"staged": slot.metadata()})

        @router.delete("/admin/models/{model}/staging")
        async def unstage(model: str, request: Request) -> JSONResponse:
            denied = self.denied(request)
            if denied is not None:
                return denied
            dropped = store.candidates.unstage(model)
            if self.sync is not None:
                self.sync.order("staging", model, {"version": None})
            return JSONResponse({"dropped": dropped})

        @router.post("/admin/reload")
        async def reload(request: Request) -> JSONResponse:
            denied = self.denied(request)
            if denied is not None:
                return denied
            serving = await run_in_threadpool(store.reload_now)
            if self.sync is not None:
                self.sync.order("reload", None, {})
            refused = {f"{m}/{v}": why for (m, v), why in store.refused.items()}
            return JSONResponse({"serving": serving, "refused": refused})

        return router

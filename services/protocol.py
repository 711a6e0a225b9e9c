"""The REST API's protocol: path patterns, request/response models, domain errors, and the one
function that maps every error to an HTTP status."""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Annotated, Any, Literal

from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.store import Job, JobNotFound, StoreUnavailable, TransitionRefused


log = logging.getLogger(__name__)

JOB_ID = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$"
# Redis stream ids are two unsigned 64-bit numbers; 19 digits stay below 2^64 (ms clocks use 13).
EVENT_ID = r"^[0-9]{1,19}(-[0-9]{1,19})?$"
IDEMPOTENCY_KEY = r"^[A-Za-z0-9._:-]{1,128}$"
TOKEN_ENV = re.compile(r"^DISTILLERY_TEACHER_TOKEN[A-Z0-9_]{0,64}$")
MAX_PATH_BYTES = 4096
JobId = Annotated[str, PathParam(pattern=JOB_ID, description="Job id as returned by POST /v1/jobs.")]
State = Literal["queued", "starting", "running", "cancelling", "succeeded", "failed", "cancelled"]


# ---------------------------------------------------------------------------------- protocol
class ErrorItem(BaseModel):
    loc: list[str | int] = Field(description="Where in the request the problem is.")
    msg: str
    type: str


class ErrorBody(BaseModel):
    error: str = Field(description="Machine-readable code: unauthorized, not_found, invalid_spec, ...")
    detail: str = Field(description="What went wrong, for a person. Never holds job data.")
    errors: list[ErrorItem] | None = Field(None, description="Validation problems, one per field (422).")


class JobRecord(BaseModel):
    id: str
    state: State
    attempt: int = Field(description="Claims so far; each scheduler claim adds one.")
    spec: dict[str, Any] = Field(description="The JobSpec as accepted: defaults filled, paths resolved.")
    name: str
    created_at: float = Field(description="Unix time, seconds.")
    updated_at: float = Field(description="Unix time, seconds.")
    owner: str = Field(description="Scheduler holding the job's lease, if any.")
    submission_id: str = Field(description="Ray Job submission id once submitted.")
    error: str
    reason: str
    failures: int = Field(description="Attempts that ended without finishing (lease lapsed, worker lost).")
    progress: dict[str, Any] = Field(description="Latest stage, step, loss and tokens/s.")
    summary: dict[str, Any] = Field(description="Final metrics and eval once the job ends.")
    checkpoint: str = Field(description="Latest checkpoint path.")
    waiting: str = Field("", description="Why a queued job is not running yet (admission: the cluster's free "
                                         "resources or the cap on running jobs); empty otherwise.")
    resumes: int = Field(0, description="Times the job was resumed after it failed or was cancelled.")

    @classmethod
    def of(cls, job: Job) -> "JobRecord":
        return cls(**dataclasses.asdict(job))


class JobList(BaseModel):
    jobs: list[JobRecord] = Field(description="Newest first.")
    offset: int
    limit: int
    next_offset: int | None = Field(description="Offset of the next page; null on the last page.")


class CancelResult(BaseModel):
    id: str
    state: State = Field(description="cancelled (was queued), cancelling (the scheduler stops it) or cancelled.")


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    status: Literal["ready", "not_ready"]
    redis: bool
    ray: bool
    teacher: bool | None = Field(None, description="The teacher at DISTILLERY_TEACHER_ENDPOINT is SERVING; "
                                                   "absent when none is configured.")


# ---------------------------------------------------------------------------------- errors
class ApiError(Exception):
    status = 400
    code = "bad_request"

    def __init__(self, detail: str, errors: list[dict[str, Any]] | None = None) -> None:
        super().__init__(detail)
        self.errors = errors


class Unauthorized(ApiError):
    status, code = 401, "unauthorized"


class PathRefused(ApiError):
    status, code = 400, "path_refused"


class UnsafeSpec(ApiError):
    status, code = 400, "unsafe_spec"


class AlreadyEnded(ApiError):
    status, code = 409, "conflict"


class NotResumable(ApiError):
    status, code = 409, "conflict"


class NeverFits(ApiError):
    """The job asks for more than the cluster has in all: it could never start."""
    status, code = 422, "does_not_fit"


class TooLarge(ApiError):
    status, code = 413, "too_large"


class InvalidSpec(ApiError):
    status, code = 422, "invalid_spec"


class InsecureConfig(ValueError):
    """serve() refuses to expose the API without keys."""


def _clean_errors(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"loc": [p if isinstance(p, (str, int)) else str(p) for p in e.get("loc", ())],
             "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))} for e in errors]


def error_response(exc: Exception) -> JSONResponse:
    """The one place where an error becomes an HTTP status. Bodies carry a code and a
    fixed or request-derived message, never another job's data."""
    headers: dict[str, str] = {}
    errors = None
    if isinstance(exc, ApiError):
        status, code, detail, errors = exc.status, exc.code, str(exc), exc.errors
    elif isinstance(exc, RequestValidationError):
        status, code, detail = 422, "invalid_request", "request parameters or headers are invalid"
        errors = _clean_errors(list(exc.errors()))
    elif isinstance(exc, JobNotFound):
        status, code, detail = 404, "not_found", "no such job"
    elif isinstance(exc, TransitionRefused):
        status, code, detail = 409, "conflict", "the job's state does not allow this"
    elif isinstance(exc, StoreUnavailable):
        log.warning("job store unavailable: %s", exc)
        status, code, detail = 503, "store_unavailable", "the job store (Redis) is unavailable; retry later"
        headers["Retry-After"] = "2"
    elif isinstance(exc, StarletteHTTPException):
        status, code, detail = exc.status_code, "http_error", str(exc.detail)
        headers.update(exc.headers or {})
    else:
        log.error("unhandled error", exc_info=exc)
        status, code, detail = 500, "internal", "internal error"
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if status == 413:  # the rest of the body is never read, so the connection cannot be reused
        headers["Connection"] = "close"
    body = ErrorBody(error=code, detail=detail, errors=errors).model_dump(exclude_none=True)
    return JSONResponse(body, status_code=status, headers=headers)


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "Missing or wrong bearer key."},
    422: {"model": ErrorBody, "description": "The request does not validate."},
    503: {"model": ErrorBody, "description": "Redis is unavailable."},
}

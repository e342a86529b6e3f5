"""How the web service answers a request it refuses or fails: always an ``ErrorResponse`` (schemas.py) that
says what to fix, whether the refusal came from our guards, Starlette, FastAPI's validation or a bug."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from cifar10_pipeline.serving.guards import UploadProblem, error_response, validation_detail


async def upload_problem(request: Request, exc: UploadProblem) -> JSONResponse:
    return error_response(exc.status_code, exc.detail, exc.errors, exc.headers)


async def http_problem(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    detail = str(exc.detail)
    if exc.status_code == 400 and detail.startswith("Too many files"):
        # Starlette's multipart parser stops at max_files; say which limit and what to do.
        max_files = request.app.state.settings.max_files
        return error_response(
            413,
            f"too many files in one request: at most {max_files}; split the images over several "
            "requests (or raise CIFAR10_SERVE_MAX_FILES)",
        )
    response = error_response(exc.status_code, detail)
    response.headers.update(exc.headers or {})
    return response


async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    detail, items = validation_detail(exc)
    return error_response(422, detail, items)


async def server_fault(request: Request, exc: Exception) -> JSONResponse:
    # A bug, not bad input: JSON like every other answer; uvicorn still logs the traceback.
    return error_response(500, "internal server error; the server log has the traceback")


def add_exception_handlers(app: FastAPI) -> None:
    app.add_exception_handler(UploadProblem, upload_problem)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, http_problem)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, invalid_request)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, server_fault)

"""The gateway's exceptions. Domain code raises these; ``app.py`` maps them to HTTP once.

::

    GatewayError                      500  (never raised directly)
    ├── BadRequest                    400  invalid JSON / parameters
    │   ├── BadSDP                    400  SDP that cannot be parsed or used
    │   └── UnsupportedCodec          400  no codec in common with the hub
    ├── Unauthorized                  401  missing, wrong, tampered or expired token
    ├── Forbidden                     403  a valid token of a role that may not do this
    ├── NotFound                      404  unknown session or viewer
    ├── Conflict                      409  session not in a state that allows the request
    ├── PreconditionFailed            412  WHEP If-Match does not name the ICE session
    ├── PayloadTooLarge               413  body over the configured cap
    ├── UnsupportedMediaType          415  wrong Content-Type
    ├── Unprocessable                 422  understood but not supported (ICE restart)
    ├── CapacityError                 429  session / viewer limit reached (Retry-After)
    │   └── RateLimited               429  too many requests from one client (Retry-After)
    ├── ServiceUnavailable            503  a fan-out worker is restarting (Retry-After)
    │   └── Saturated                 503  no process has room for another viewer (Retry-After)
    └── UpstreamError                 502  the avatar upstream failed
        ├── UpstreamAuthError         502  the provider refused the gateway's API key
        ├── UpstreamSessionGone       502  the provider no longer knows the session
        ├── UpstreamQuotaExceeded     429  the provider's concurrency/plan limit (Retry-After)
        └── UpstreamUnavailable       503  the provider cannot be reached now (5xx, timeout)
"""

from __future__ import annotations

from typing import ClassVar


class GatewayError(Exception):
    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class BadRequest(GatewayError):
    status = 400
    code = "bad_request"


class BadSDP(BadRequest):
    code = "bad_sdp"


class UnsupportedCodec(BadRequest):
    code = "unsupported_codec"


class Unauthorized(GatewayError):
    status = 401
    code = "unauthorized"


class Forbidden(GatewayError):
    status = 403
    code = "forbidden"


class NotFound(GatewayError):
    status = 404
    code = "not_found"


class Conflict(GatewayError):
    status = 409
    code = "conflict"


class PreconditionFailed(GatewayError):
    status = 412
    code = "precondition_failed"


class PayloadTooLarge(GatewayError):
    status = 413
    code = "payload_too_large"


class UnsupportedMediaType(GatewayError):
    status = 415
    code = "unsupported_media_type"


class Unprocessable(GatewayError):
    status = 422
    code = "unprocessable"


class CapacityError(GatewayError):
    status = 429
    code = "capacity"


class RateLimited(CapacityError):
    code = "rate_limited"


class ServiceUnavailable(GatewayError):
    status = 503
    code = "service_unavailable"


class Saturated(ServiceUnavailable):
    code = "saturated"

    def __init__(self, message: str, *, retry_after: float | None = 5.0) -> None:
        super().__init__(message, retry_after=retry_after)


class UpstreamError(GatewayError):
    status = 502
    code = "upstream_error"


class UpstreamAuthError(UpstreamError):
    code = "upstream_auth"


class UpstreamSessionGone(UpstreamError):
    code = "upstream_session_gone"


class UpstreamQuotaExceeded(UpstreamError):
    status = 429
    code = "upstream_quota"


class UpstreamUnavailable(UpstreamError):
    status = 503
    code = "upstream_unavailable"

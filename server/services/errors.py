"""Errors the services raise; the API maps each class to one HTTP status (server/main.py)."""

from __future__ import annotations


class ServiceError(Exception):
    """A request that cannot be done; the message says why and what to do."""

    status = 400


class NotFound(ServiceError):
    status = 404


class Conflict(ServiceError):
    """The request clashes with the current state (a name taken, an image in use, ...)."""

    status = 409


class Invalid(ServiceError):
    """The request is well-formed but its values do not make sense (400; 422 is left to
    schema validation errors, which have their own shape)."""

    status = 400


class Unauthorized(ServiceError):
    status = 401


class Forbidden(ServiceError):
    status = 403

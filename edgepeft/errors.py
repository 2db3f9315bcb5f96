"""Typed errors. Raised where the problem is found; the CLI turns each into one line."""


class EdgePeftError(Exception):
    """Base of every error edgepeft raises on purpose. The message is one line, with the fix where known."""


class ExportError(EdgePeftError):
    """The workstation export cannot proceed (bad model directory, options, architecture)."""


class BundleError(EdgePeftError):
    """A bundle is missing, malformed, or does not match what the caller expects."""


class DeltaError(EdgePeftError):
    """A delta file is corrupt, hostile, or does not fit the bundle it is used with."""


class DataError(EdgePeftError):
    """Training or evaluation data is unreadable or inconsistent with the bundle."""


class TrainError(EdgePeftError):
    """Training cannot run as configured (memory budget, checkpoint, numerics)."""


class HubError(EdgePeftError):
    """The hub refused a request or cannot be reached."""


class GenerationError(EdgePeftError):
    """Text generation cannot run as asked (sampling options out of range, a bundle that is not a causal LM)."""


class NotFoundError(HubError):
    """The hub has no such fleet, device, bundle or version (HTTP 404)."""


class ConflictError(HubError):
    """The name is taken, or the request contradicts what the hub holds (HTTP 409)."""


class AuthError(HubError):
    """A credential that is missing, wrong, revoked or rotated (HTTP 401)."""


class UnavailableError(HubError):
    """The hub's store lacks a row a request needs (a fleet, its bundle) until an admin restores it (HTTP 503)."""

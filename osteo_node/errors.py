"""The node's exception hierarchy. Each docstring says what went wrong and how to fix it."""


class OsteoNodeError(Exception):
    """Base class for every error the node raises on purpose."""


class ConfigError(OsteoNodeError):
    """The configuration file is invalid: the message names the key, the value and what is allowed."""


class BundleError(OsteoNodeError):
    """A model bundle is missing, incomplete or altered: re-export it or point `model.bundle` elsewhere."""


class SchemaError(OsteoNodeError):
    """The database schema is not the one this osteo-node needs (an upgrade added migrations):
    stop the node's processes and run `osteo-node db upgrade --config FILE`."""


class ImageError(OsteoNodeError):
    """A stored image cannot be decoded or prepared (e.g. no pixel data, unsupported encoding)."""


class SendError(OsteoNodeError):
    """A destination refused or did not answer a C-STORE; the queue retries it later."""


class StoreError(OsteoNodeError):
    """The file store could not persist or read an object (disk full, permissions, bad path)."""


class JobError(OsteoNodeError):
    """A job cannot succeed however often it is retried (its file, result or destination is gone).

    The job is dead-lettered with this message; fix the cause, then `osteo-node jobs retry ID`.
    """


class DxaError(OsteoNodeError):
    """A DXA result cannot be used (no T-score, a value outside -7..+7, a date in the future, an
    unknown patient or source). The message says which field; nothing is stored."""

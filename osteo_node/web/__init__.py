"""The DXA referral worklist web application (`osteo-node web`)."""

from .app import create_app

__all__ = ["create_app"]

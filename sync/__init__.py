"""contacts-sync: an exact, incremental SQL mirror of a CRM's contacts list."""

__version__ = "0.1.0"

__all__ = ["__version__"]

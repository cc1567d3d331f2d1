"""wa-router: one URL in front of a pool of Node.js WhatsApp services."""

__version__ = "0.1.0"

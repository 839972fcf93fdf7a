"""The server registry."""

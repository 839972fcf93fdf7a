"""Stateless executors run on the node: site, docker, db, fileops, security, backup."""

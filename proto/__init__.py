"""Protobuf contracts (agent channel, command envelope, results) and their generated modules."""

"""The gateway: agents' gRPC endpoint (enrollment, the Connect stream, OTLP metrics)."""

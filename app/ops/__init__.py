"""What an operator reads: Prometheus metrics and structured logs."""

"""Generated gRPC modules (built from protos/streamgen/v1/*.proto by `make setup`)."""

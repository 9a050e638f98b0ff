"""Generated gRPC modules, built from protos/streamgen/v1/*.proto by the package build (setup.py)."""

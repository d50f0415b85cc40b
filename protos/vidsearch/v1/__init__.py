"""Generated gRPC/protobuf code for the vidsearch v1 API (built from the .proto files at install time)."""

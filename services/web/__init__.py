"""The search page: an HTTP Serve application in front of the gRPC search path."""

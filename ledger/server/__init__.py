"""The gRPC edge: the only hand-written code that imports grpc or the generated modules."""

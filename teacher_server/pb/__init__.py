"""Generated gRPC stubs for distillery.teacher.v1 (do not edit; run `make proto`)."""

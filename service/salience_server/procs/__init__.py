"""Several processes for one server (`--frontends N`, N >= 2): TensorFlow-free front
ends (`frontend`) that serve the gRPC port over one device owner (`owner`), with
tensors in shared memory between them (`wire`) and the owner's models described
to the front ends as plain data (`state`).
"""

"""The Open Inference Protocol's wire schema (package `inference`, the KServe v2 gRPC
protocol that Triton also speaks); `inference.v2` holds its generated stubs.
"""

"""Generated stubs of `inference/v2/grpc_service.proto`, the Open Inference Protocol
(regenerate with scripts/generate_protos.py).
"""

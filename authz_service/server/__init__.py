"""The shells around the Engine: gRPC Check (grpc.py), admin HTTP (admin.py), one serving process
(service.py) and the supervisor of several (workers.py). None of them decides anything."""

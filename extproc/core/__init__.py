"""What the sidecar decides: pure functions and values, no I/O, grpc, psycopg or telemetry.

Rules for everything under this package:
* no imports of asyncio, grpc, psycopg, httpx, opentelemetry or generated ``*_pb2`` modules;
* ports are ``typing.Protocol``s (see ``ports``), supplied by ``extproc.adapters``;
* no logging or metrics calls: functions return facts, adapters record them.
"""

"""pylayers as containerd's snapshotter: the `containerd.services.snapshots.v1.Snapshots`
gRPC service (`service`), for containerd's proxy snapshotter plugin.

Modules: `snapshots.proto` and `mount.proto` (our interface files: containerd's
messages and field numbers), `snapshots_pb2`, `snapshots_pb2_grpc` and `mount_pb2`
(generated from them by the build, CMakeLists.txt; not in the repository), `filters`
(containerd's filter syntax for List), `service` (the servicer and `serve`).
"""
